"""google/gemma-4-E4B-it's checkpoint layout, written down once: its config.json and tensor names.

Real weights cannot be fetched where this project is tested, so the demo model (serve/demo_model.py)
and the GPU benchmark stand-in (benchmarks/stand_in.py) are built from this description, and a test
checks what they write against it. Sources, since the checkpoint itself is out of reach:

* transformers' Gemma 4 code, 5.14 (what vLLM < 0.28 runs with) and 5.19 (this project's venv):
  the config classes' fields, and every parameter and persistent buffer of
  ``Gemma4ForConditionalGeneration``; both versions build the same tensor names.
* what vLLM's loaders read, 0.23 (``model_executor/models/gemma4.py``, ``gemma4_mm.py``) and 0.32:
  ``config.<attr>`` and ``getattr(config, ...)`` reads (``VLLM_READS``), and the weights they map.
* the KV-shared layers: transformers builds no k/v projections or k_norm for them and lists those
  names in ``_keys_to_ignore_on_load_unexpected`` ("drop all k/v proj and norms for the shared
  layers"), vLLM 0.32 drops "the K/V tensors original checkpoints still ship for them", and vLLM
  0.23 *requires* them (it builds qkv_proj and k_norm on every layer). So the checkpoint has them.
* values the E4B checkpoint is published with (42 layers, hidden 2560, 18 KV-shared layers, head
  dims 256/512, towers of 16 and 12 layers, 280 soft tokens per image, ...).

Two traps this file exists for. transformers 5.19 serialises a text config as ``per_layer_config``
without ``global_head_dim`` and a vision rope as ``"axial"``, which transformers 5.14 (and so vLLM
0.23) reads as a 512-wide global head and an unknown rope type; the checkpoint has
``global_head_dim`` and ``"default"``, which both versions read. And transformers' vision config has
no ``default_output_length`` field, which vLLM's processor reads: a config written by
``save_pretrained`` lacks it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

# config.json of google/gemma-4-E4B-it (the model-specific keys; PretrainedConfig's bookkeeping keys,
# GENERIC_KEYS, may be present or not). Token ids are the real tokenizer's.
E4B_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma4ForConditionalGeneration"],
    "model_type": "gemma4",
    "audio_token_id": 258881,
    "boa_token_id": 256000,
    "boi_token_id": 255999,
    "eoa_token_id": 258883,
    "eoa_token_index": 258883,
    "eoi_token_id": 258882,
    "image_token_id": 258880,
    "video_token_id": 258884,
    "eos_token_id": [1, 106],
    "dtype": "bfloat16",
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
    "vision_soft_tokens_per_image": 280,
    "text_config": {
        "model_type": "gemma4_text",
        "vocab_size": 262144,
        "vocab_size_per_layer_input": 262144,
        "hidden_size": 2560,
        "hidden_size_per_layer_input": 256,
        "intermediate_size": 10240,
        "num_hidden_layers": 42,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_global_key_value_heads": None,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_kv_shared_layers": 18,
        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(42)],
        "sliding_window": 512,
        "rope_parameters": {
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "max_position_embeddings": 131072,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": False,
        "use_double_wide_mlp": False,
        "use_bidirectional_attention": None,
        "enable_moe_block": False,
        "num_experts": None,
        "top_k_experts": None,
        "moe_intermediate_size": None,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "head_dim": 64,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 10240,
        "default_output_length": 280,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_clipped_linears": True,
        "standardize": False,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    },
    "audio_config": {
        "model_type": "gemma4_audio",
        "hidden_size": 1024,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "hidden_act": "silu",
        "subsampling_conv_channels": [128, 32],
        "conv_kernel_size": 5,
        "residual_weight": 0.5,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "attention_invalid_logits_value": -1000000000.0,
        "use_clipped_linears": True,
        "rms_norm_eps": 1e-06,
        "gradient_clipping": 10000000000.0,
        "output_proj_dims": 1536,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    },
}
SECTIONS = ("text_config", "vision_config", "audio_config")

# PretrainedConfig's own bookkeeping, which save_pretrained may or may not write; no loader reads it.
GENERIC_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "chunk_size_feed_forward", "id2label", "label2id",
        "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
        "return_dict", "transformers_version", "torch_dtype", "dtype",
    }
)  # fmt: skip

# Attributes vLLM's Gemma 4 code reads from each config (config.X, getattr(config, "X"), 0.23 and
# 0.32 together). Those marked derived are computed by transformers on load, not stored.
VLLM_READS: dict[str, tuple[str, ...]] = {
    "": (
        "text_config", "vision_config", "audio_config", "boi_token_id", "eoi_token_id",
        "boa_token_id", "eoa_token_index", "eoa_token_id",
    ),
    "text_config": (
        "attention_bias", "head_dim", "global_head_dim", "hidden_activation", "hidden_size",
        "intermediate_size", "layer_types", "max_position_embeddings", "num_attention_heads",
        "num_key_value_heads", "num_global_key_value_heads", "num_hidden_layers", "rms_norm_eps",
        "rope_parameters", "sliding_window", "tie_word_embeddings", "vocab_size",
        "vocab_size_per_layer_input", "hidden_size_per_layer_input", "num_kv_shared_layers",
        "attention_k_eq_v", "enable_moe_block", "use_double_wide_mlp", "final_logit_softcapping",
        "num_experts", "top_k_experts", "moe_intermediate_size", "use_bidirectional_attention",
    ),
    "vision_config": (
        "default_output_length", "hidden_size", "intermediate_size", "patch_size",
        "pooling_kernel_size", "position_embedding_size", "standardize", "rms_norm_eps",
    ),
    "audio_config": ("hidden_size", "rms_norm_eps", "output_proj_dims"),
}  # fmt: skip
VLLM_DERIVED = {"text_config": ("per_layer_config",)}  # 0.32 reads it; transformers >= 5.19 builds it

# processor_config.json: the keys vLLM's Gemma 4 processor and transformers' Gemma4Processor read.
PROCESSOR_KEYS: dict[str, tuple[str, ...]] = {
    "": ("processor_class", "image_seq_length", "audio_seq_length", "audio_ms_per_token"),
    "feature_extractor": ("feature_extractor_type", "sampling_rate", "fft_length", "feature_size"),
    "image_processor": ("image_processor_type", "max_soft_tokens", "patch_size", "pooling_kernel_size"),
    "video_processor": ("video_processor_type", "max_soft_tokens", "patch_size", "pooling_kernel_size"),
}

# ---------------------------------------------------------------------------------------------
# Tensor names, per repeated block. A Gemma4ClippableLinear is `<name>.linear.weight` plus its four
# clip bounds when the tower's use_clipped_linears is set.

TEXT_GLOBAL = (
    "embed_tokens.weight", "embed_tokens_per_layer.weight", "norm.weight",
    "per_layer_model_projection.weight", "per_layer_projection_norm.weight",
)  # fmt: skip
# Every text layer, the KV-shared ones included: the checkpoint ships k_proj, v_proj and k_norm for
# them although no framework computes with them (v_norm has no weight).
TEXT_LAYER = (
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "post_per_layer_input_norm.weight", "layer_scalar",
    "per_layer_input_gate.weight", "per_layer_projection.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
)  # fmt: skip
KV_SHARED_EXTRA = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight")
CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")
VISION_GLOBAL = ("patch_embedder.input_proj.weight", "patch_embedder.position_embedding_table")
VISION_STANDARDIZE = ("std_bias", "std_scale")
VISION_LAYER_NORMS = (
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
)  # fmt: skip
VISION_LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
AUDIO_GLOBAL = (
    "output_proj.weight", "output_proj.bias", "subsample_conv_projection.input_proj_linear.weight",
    "subsample_conv_projection.layer0.conv.weight", "subsample_conv_projection.layer0.norm.weight",
    "subsample_conv_projection.layer1.conv.weight", "subsample_conv_projection.layer1.norm.weight",
)  # fmt: skip
AUDIO_LAYER_PLAIN = (
    "norm_pre_attn.weight", "norm_post_attn.weight", "norm_out.weight",
    "self_attn.per_dim_scale", "self_attn.relative_k_proj.weight",
    "feed_forward1.pre_layer_norm.weight", "feed_forward1.post_layer_norm.weight",
    "feed_forward2.pre_layer_norm.weight", "feed_forward2.post_layer_norm.weight",
    "lconv1d.pre_layer_norm.weight", "lconv1d.conv_norm.weight", "lconv1d.depthwise_conv1d.weight",
)  # fmt: skip
AUDIO_LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.post",
    "feed_forward1.ffw_layer_1", "feed_forward1.ffw_layer_2",
    "feed_forward2.ffw_layer_1", "feed_forward2.ffw_layer_2",
    "lconv1d.linear_start", "lconv1d.linear_end",
)  # fmt: skip
EMBEDDERS = ("embed_vision.embedding_projection.weight", "embed_audio.embedding_projection.weight")

LM_PREFIX = "model.language_model."


def _clippable(prefix: str, names: Iterable[str], clipped: bool) -> set[str]:
    bounds = CLIP_BOUNDS if clipped else ()
    return {f"{prefix}{n}.{leaf}" for n in names for leaf in ("linear.weight", *bounds)}


def kv_shared_layers(text: Mapping[str, Any]) -> range:
    n = int(text["num_hidden_layers"])
    return range(n - int(text.get("num_kv_shared_layers") or 0), n)


def text_tensors(config: Mapping[str, Any], prefix: str = LM_PREFIX) -> set[str]:
    """The language model's tensors, under ``prefix`` (``model.`` in a text-only export)."""
    text = config.get("text_config", config)
    names = {prefix + n for n in TEXT_GLOBAL}
    for i in range(int(text["num_hidden_layers"])):
        names |= {f"{prefix}layers.{i}.{n}" for n in TEXT_LAYER}
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return names if tie else names | {"lm_head.weight"}


def full_tensors(config: Mapping[str, Any]) -> set[str]:
    """Every tensor name of a Gemma4ForConditionalGeneration checkpoint with this config.json."""
    names = text_tensors(config)
    vision, audio = config.get("vision_config"), config.get("audio_config")
    if vision:
        clipped = bool(vision.get("use_clipped_linears"))
        names |= {f"model.vision_tower.{n}" for n in VISION_GLOBAL}
        if vision.get("standardize"):
            names |= {f"model.vision_tower.{n}" for n in VISION_STANDARDIZE}
        for i in range(int(vision["num_hidden_layers"])):
            prefix = f"model.vision_tower.encoder.layers.{i}."
            names |= {prefix + n for n in VISION_LAYER_NORMS}
            names |= _clippable(prefix, VISION_LAYER_LINEARS, clipped)
        names.add("model." + EMBEDDERS[0])
    if audio:
        clipped = bool(audio.get("use_clipped_linears"))
        names |= {f"model.audio_tower.{n}" for n in AUDIO_GLOBAL}
        for i in range(int(audio["num_hidden_layers"])):
            prefix = f"model.audio_tower.layers.{i}."
            names |= {prefix + n for n in AUDIO_LAYER_PLAIN}
            names |= _clippable(prefix, AUDIO_LAYER_LINEARS, clipped)
        names.add("model." + EMBEDDERS[1])
    return names


def config_problems(config: Mapping[str, Any], *, text_only: bool = False) -> list[str]:
    """Where a config.json's keys differ from the checkpoint's: missing keys, and keys it does not
    have (a transformers serialisation such as per_layer_config). Empty when they agree."""
    problems: list[str] = []
    pairs = [("text_config", config, E4B_CONFIG["text_config"])] if text_only else [("", config, E4B_CONFIG)]
    if not text_only:
        pairs += [(s, config.get(s) or {}, E4B_CONFIG[s]) for s in SECTIONS]
    for section, have, want in pairs:
        want_keys = set(want) - (set(SECTIONS) if section == "" else set())
        have_keys = set(have) - (set(SECTIONS) if section == "" else set())
        where = section or "top level"
        problems += [f"{where}: missing {k!r}" for k in sorted(want_keys - have_keys - GENERIC_KEYS)]
        problems += [
            f"{where}: not in the checkpoint {k!r}" for k in sorted(have_keys - want_keys - GENERIC_KEYS)
        ]
    return problems


def structure_problems(config: Mapping[str, Any]) -> list[str]:
    """The structural facts loaders depend on, checked on a (scaled) config.json."""
    text = config.get("text_config", config)
    problems = []
    types = list(text["layer_types"])
    shared = kv_shared_layers(text)
    first = shared.start
    if len(types) != text["num_hidden_layers"] or types[-1] != "full_attention":
        problems.append("layer_types: one per layer, the last full_attention")
    if not 0 < len(shared) < text["num_hidden_layers"]:
        problems.append("num_kv_shared_layers: some layers, not all")
    # vLLM shares a layer's KV with the last earlier layer of its type: both types must occur
    # before the first shared layer and among the shared ones.
    if {types[i] for i in shared} != {"sliding_attention", "full_attention"} or set(types[:first]) != {
        "sliding_attention",
        "full_attention",
    }:
        problems.append("layer_types: both attention types before and after the first KV-shared layer")
    if text.get("global_head_dim") != 2 * text["head_dim"]:
        problems.append("global_head_dim: twice head_dim (256/512 in the checkpoint)")
    if text["hidden_size_per_layer_input"] <= 0:
        problems.append("hidden_size_per_layer_input: per-layer embeddings present")
    if "vision_config" in config:
        vision = config["vision_config"]
        if vision.get("rope_parameters", {}).get("rope_type") != "default":
            problems.append(
                "vision_config.rope_parameters.rope_type: 'default' (transformers 5.14 reads no other)"
            )
        if config.get("vision_soft_tokens_per_image") != vision.get("default_output_length"):
            problems.append("vision_soft_tokens_per_image != vision_config.default_output_length")
    return problems


def scaled(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """E4B_CONFIG with ``overrides`` applied (a section's dict updates that section): the same keys,
    other sizes."""
    config = copy.deepcopy(E4B_CONFIG)
    for key, value in overrides.items():
        if key in SECTIONS:
            unknown = set(value) - set(config[key])
            if unknown:
                raise KeyError(f"{key}: {sorted(unknown)} are not keys of the checkpoint's config")
            config[key].update(copy.deepcopy(value))
        elif key not in config:
            raise KeyError(f"{key!r} is not a key of the checkpoint's config")
        else:
            config[key] = copy.deepcopy(value)
    return config


def layer_index(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match[1]) if match else None

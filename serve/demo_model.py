"""A tiny, random, seeded Gemma 4 in the real google/gemma-4-E4B-it layout, plus a LoRA adapter.

Real weights cannot be downloaded everywhere this project runs (CI, offline machines), so the demo
and the tests build a stand-in with the same structure as the real thing:

* the base is ``Gemma4ForConditionalGeneration`` with the checkpoint's config keys and tensor names
  as written down in serve/gemma4_layout.py (text, vision and audio towers, per-layer embeddings,
  KV-shared layers that still carry k/v projections and k_norm, tied embeddings; tower projections
  are ``Gemma4ClippableLinear``, weights at ``...q_proj.linear.weight``), at tiny sizes;
* the tokenizer is a byte-level BPE trained on the fly with Gemma 4's turn tokens and a Gemma 4
  style chat template;
* the adapter is in PEFT's on-disk format with the model card's settings (r=16, alpha=16, seven
  target modules) and carries tower LoRA keys under the names the card's monkey-patch produces
  (``...q_proj.lora_A.weight``, no ``.linear``).

One thing is planted on purpose: a random model under a JSON grammar writes strings that almost
never close (a closing quote is a handful of tokens in the vocabulary). Embedding dimension 0 is
set to a positive constant for every token and larger for JSON-closing tokens, which makes the
random model prefer them, so guided outputs finish in tens of tokens instead of thousands on CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from serve import gemma4_layout

DEMO_SEED = 0
LORA_RANK = 16
LORA_ALPHA = 16
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB_SIZE = 1024

# Gemma 4's control tokens. The first four ids match the real tokenizer (pad, eos, bos, unk).
SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
    "<|image>", "<image|>", "<|image|>", "<|video|>", "<|audio>", "<audio|>", "<|audio|>",
)  # fmt: skip
# Gemma4Processor finds its media tokens by these tokenizer attributes.
MEDIA_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
}  # fmt: skip

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- if sys is not none or enable_thinking -%}"
    "{{ '<|turn>system\\n' }}{{ '<|think|>' if enable_thinking else '' }}{{ sys or '' }}{{ '<turn|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] + '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)

# Words and JSON fragments the demo tokenizer learns its merges from: the model card's prompt,
# schema keys and typical endpoint vocabulary, so the demo's text looks like the real domain.
_WORDS = [
    "progression",
    "free",
    "survival",
    "overall",
    "objective",
    "response",
    "rate",
    "complete",
    "partial",
    "disease",
    "control",
    "duration",
    "time",
    "to",
    "event",
    "hazard",
    "ratio",
    "median",
    "mean",
    "proportion",
    "count",
    "change",
    "from",
    "baseline",
    "week",
    "weeks",
    "month",
    "months",
    "year",
    "years",
    "up",
    "to",
    "day",
    "days",
    "RECIST",
    "v1.1",
    "iRECIST",
    "WHO",
    "criteria",
    "CT",
    "scan",
    "MRI",
    "ECG",
    "blood",
    "test",
    "HbA1c",
    "mmHg",
    "mg/dL",
    "ng/mL",
    "mL",
    "ms",
    "kg",
    "cm",
    "%",
    "number",
    "participants",
    "patients",
    "adverse",
    "events",
    "serious",
    "safety",
    "population",
    "ITT",
    "per-protocol",
    "composite",
    "components",
    "death",
    "myocardial",
    "infarction",
    "stroke",
    "hospitalization",
    "heart",
    "failure",
    "quality",
    "of",
    "life",
    "score",
    "scale",
    "questionnaire",
    "EQ-5D",
    "HAM-D",
    "PANSS",
    "EDSS",
    "NYHA",
    "ACR20",
    "PASI",
    "biomarker",
    "assessed",
    "measured",
    "randomization",
    "treatment",
    "continuous",
    "binary",
    "time-to-event",
    "ordinal",
    "endpoint_name_standardized",
    "measurement_of",
    "measurement_type",
    "metric_type",
    "timeframe",
    "measurement_method",
    "evaluation_criteria",
    "unit",
    "population",
    "is_composite",
    "components",
    "endpoints",
    "null",
    "true",
    "false",
]
_PROMPT_TEXT = (
    "You are a clinical trial endpoint extraction system. Extract structured endpoint information "
    "from clinical trial text. Return ONLY valid JSON. Extract all endpoint fields from this "
    "clinical trial text. Return ONLY a JSON.\n\nText:\n\n\nOutput (JSON only):"
)
# Tokens whose embedding gets the planted bias, by tier. Inside a string everything but a quote
# is plain text, so quote closers must outrank the others or `nullnull...` never ends; `",` is
# left out because it would keep a list growing.
_CLOSER_BIAS = {
    '"': 2.0,
    '"]': 2.0,
    '"}': 2.0,
    "null": 1.5,
    "]": 1.5,
    "}": 1.5,
    "false": 1.5,
    "}]": 1.5,
    "]}": 1.5,
}


# Fewest vision tokens Gemma 4 allows per image (70, 140, 280, 560 or 1120): keeps the tiny vision
# tower's patch grid inside its position table and vLLM's multimodal profiling quick.
DEMO_SOFT_TOKENS = 70


@dataclass(frozen=True)
class DemoPaths:
    base: Path
    adapter: Path


def text_config(vocab_size: int = VOCAB_SIZE) -> dict[str, object]:
    """A 4-layer Gemma 4 text config: sliding/full alternating; the last two layers share the KV
    cache of the first two (vLLM needs an earlier layer of the same type to share with)."""
    return {
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "global_head_dim": 128,
        "hidden_size_per_layer_input": 16,
        "num_kv_shared_layers": 2,
        "sliding_window": 128,
        "max_position_embeddings": 32768,
        "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": [1, 6],
        "bos_token_id": 2,
    }


def train_gemma4_tokenizer(lines: Iterable[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on ``lines`` with Gemma 4's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=list(SPECIAL_TOKENS[5:]),
        extra_special_tokens=MEDIA_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.add_bos_token = False  # the chat template writes <bos> itself
    return fast


def _train_tokenizer(seed: int):  # -> PreTrainedTokenizerFast
    rng = random.Random(seed)
    examples = [
        '{"endpoints": [{"endpoint_name_standardized": "Body height", "measurement_of": "height", '
        '"measurement_type": "continuous", "metric_type": null, "timeframe": null, '
        '"measurement_method": "Stadiometer", "evaluation_criteria": null, "unit": "cm", '
        '"population": null, "is_composite": false, "components": []}]}'
    ]
    corpus = [_PROMPT_TEXT, *examples * 50]
    corpus += [" ".join(rng.choice(_WORDS) for _ in range(40)) for _ in range(2000)]
    return train_gemma4_tokenizer(corpus, VOCAB_SIZE)


def _plant_closing_bias(embed: torch.Tensor, tokenizer: object) -> None:
    vocab: dict[str, int] = tokenizer.get_vocab()  # type: ignore[attr-defined]
    embed[:, 0] = 1.0
    for piece, bias in _CLOSER_BIAS.items():
        ids = tokenizer.encode(piece, add_special_tokens=False)  # type: ignore[attr-defined]
        if len(ids) == 1:
            embed[ids[0], 0] = bias
    assert embed.shape[0] >= len(vocab)


def media_token_ids(tokenizer: object) -> dict[str, int]:
    """The config's media token ids, read from ``tokenizer`` (Gemma4Processor finds them there too)."""
    ids = {
        "boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>",
        "video_token_id": "<|video|>", "boa_token_id": "<|audio>", "eoa_token_id": "<audio|>",
        "eoa_token_index": "<audio|>", "audio_token_id": "<|audio|>",
    }  # fmt: skip
    return {key: int(tokenizer.convert_tokens_to_ids(token)) for key, token in ids.items()}  # type: ignore[attr-defined]


def demo_config(media_ids: Mapping[str, int], turn_end: int) -> dict[str, Any]:
    """The demo's config.json: the checkpoint's keys and structure (serve/gemma4_layout.py), tiny sizes."""
    return gemma4_layout.scaled(
        {
            **media_ids,
            "eos_token_id": [1, turn_end],
            "vision_soft_tokens_per_image": DEMO_SOFT_TOKENS,
            "text_config": text_config(),
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "position_embedding_size": 64,
                "default_output_length": DEMO_SOFT_TOKENS,
            },
            "audio_config": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "subsampling_conv_channels": [8, 4],
                "output_proj_dims": 32,
            },
        }  # fmt: skip
    )


def _kv_shared_tensors(config: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """k_proj, v_proj and k_norm of the KV-shared layers: the checkpoint ships them though
    transformers builds no module for them (and vLLM 0.23 fails to load without k_norm)."""
    text = config["text_config"]
    gen = torch.Generator().manual_seed(seed + 2)
    tensors: dict[str, torch.Tensor] = {}
    for i in gemma4_layout.kv_shared_layers(text):
        full = text["layer_types"][i] == "full_attention"
        head_dim = text["global_head_dim"] if full else text["head_dim"]
        kv_width = text["num_key_value_heads"] * head_dim
        prefix = f"{gemma4_layout.LM_PREFIX}layers.{i}.self_attn."
        for proj in ("k_proj", "v_proj"):
            tensors[f"{prefix}{proj}.weight"] = (
                torch.randn(kv_width, text["hidden_size"], generator=gen) * 0.02
            )
        tensors[f"{prefix}k_norm.weight"] = 1.0 + 0.1 * torch.randn(head_dim, generator=gen)
    return tensors


def write_base(out: Path, seed: int = DEMO_SEED) -> Path:
    """Write a random Gemma4ForConditionalGeneration checkpoint with tokenizer to ``out``: the
    real checkpoint's config keys and tensor names (serve/gemma4_layout.py), tiny sizes."""
    from transformers import AutoConfig, Gemma4ForConditionalGeneration, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(seed)
    turn_end = int(tokenizer.convert_tokens_to_ids("<turn|>"))
    config = demo_config(media_token_ids(tokenizer), turn_end)
    # Written by hand, not by save_pretrained: transformers >= 5.19 would write per_layer_config for
    # global_head_dim and an "axial" vision rope, which transformers 5.14 (vLLM 0.23) misreads.
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    loaded = AutoConfig.from_pretrained(out)
    for sub in (loaded, *(getattr(loaded, s) for s in gemma4_layout.SECTIONS)):
        sub.dtype = None  # initialise in fp32 (towers would start in the config's bf16), cast below
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(loaded).eval()
    with torch.no_grad():
        _plant_closing_bias(model.model.language_model.embed_tokens.weight, tokenizer)
        # Clip bounds are finite in the real checkpoint; make them so here, so a merge that drops
        # or resets them is caught.
        for name, buf in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                buf.fill_(-8.0)
            elif name.endswith(("input_max", "output_max")):
                buf.fill_(8.0)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    state |= _kv_shared_tensors(config, seed)
    expected = gemma4_layout.full_tensors(config)
    if set(state) != expected:
        raise RuntimeError(
            f"demo base differs from the checkpoint layout: missing {sorted(expected - set(state))[:5]}, "
            f"extra {sorted(set(state) - expected)[:5]} (did transformers' Gemma 4 change?)"
        )
    bf16 = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(state.items())}
    save_file(bf16, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    write_processor_config(out)
    GenerationConfig(bos_token_id=2, eos_token_id=[1, turn_end], pad_token_id=0).save_pretrained(out)
    return out


def write_processor_config(out: Path, soft_tokens: int = DEMO_SOFT_TOKENS) -> Path:
    """Write ``processor_config.json``: the audio, image and video processor settings that vLLM
    loads through transformers' Gemma4Processor to serve the full multimodal layout.

    Written from the processors' own defaults rather than by ``Gemma4Processor.save_pretrained``:
    its image and video processors import torchvision, which has no build beside torch+cpu.
    """
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    image = json.loads(Gemma4ImageProcessorPil(max_soft_tokens=soft_tokens).to_json_string())
    image["image_processor_type"] = "Gemma4ImageProcessor"
    video = {
        key: image[key]
        for key in ("do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor")
        + ("image_mean", "image_std", "patch_size", "pooling_kernel_size")
    }
    video |= {
        "video_processor_type": "Gemma4VideoProcessor",
        "do_normalize": True,
        "num_frames": 32,
        "do_sample_frames": True,
        "max_soft_tokens": soft_tokens,
    }
    processor = {
        "processor_class": "Gemma4Processor",
        "image_seq_length": soft_tokens,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "feature_extractor": json.loads(Gemma4AudioFeatureExtractor().to_json_string()),
        "image_processor": image,
        "video_processor": video,
    }
    path = out / "processor_config.json"
    path.write_text(json.dumps(processor, indent=2) + "\n")
    return path


def _linear_shapes(base: Path) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every LoRA target in the base, named as PEFT would name it
    after the model card's monkey-patch (tower ``...q_proj.linear`` becomes ``...q_proj``). The
    KV-shared layers' k/v projections are left out: no model builds them, so no adapter trains them."""
    from safetensors import safe_open

    text = json.loads((base / "config.json").read_text())["text_config"]
    unused = {
        f"{gemma4_layout.LM_PREFIX}layers.{i}.{name}"
        for i in gemma4_layout.kv_shared_layers(text)
        for name in gemma4_layout.KV_SHARED_EXTRA
    }
    shapes: dict[str, tuple[int, int]] = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if parts[-1] != "weight" or key in unused:
                    continue
                module = parts[:-2] if parts[-2] == "linear" else parts[:-1]
                if module[-1] in TARGET_MODULES:
                    out_f, in_f = f.get_slice(key).get_shape()
                    shapes[".".join(module)] = (out_f, in_f)
    return shapes


def write_adapter(base: Path, out: Path, seed: int = DEMO_SEED, *, towers: bool = True) -> Path:
    """Write a random LoRA adapter for ``base`` in PEFT's format (non-zero B, seeded)."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors: dict[str, torch.Tensor] = {}
    for module, (out_f, in_f) in sorted(_linear_shapes(base).items()):
        if not towers and ".language_model." not in f".{module}.":
            continue
        a = torch.randn(LORA_RANK, in_f, generator=gen) / in_f**0.5
        b = torch.randn(out_f, LORA_RANK, generator=gen) * 0.02
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.05,
        "target_modules": sorted(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def build_demo(root: Path, seed: int = DEMO_SEED) -> DemoPaths:
    """Write the demo base and adapter under ``root`` (reused when already complete)."""
    base, adapter = root / "base", root / "adapter"
    if not (base / "config.json").exists():
        write_base(base, seed)
    if not (adapter / "adapter_config.json").exists():
        write_adapter(base, adapter, seed)
    return DemoPaths(base=base, adapter=adapter)

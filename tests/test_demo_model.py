"""The tiny factory writes the real google/gemma-4-E4B-it layout, deterministically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from serve import gemma4_layout
from serve.demo_model import DEMO_SOFT_TOKENS, DemoPaths, build_demo


def _keys(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_base_layout_is_gemma4_conditional_generation(demo: DemoPaths) -> None:
    config = json.loads((demo.base / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForConditionalGeneration"]
    text = config["text_config"]
    assert text["hidden_size_per_layer_input"] > 0 and text["num_kv_shared_layers"] >= 1
    assert config["tie_word_embeddings"] is True
    keys = _keys(demo.base / "model.safetensors")
    assert "lm_head.weight" not in keys  # tied
    assert "model.language_model.embed_tokens_per_layer.weight" in keys
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight" in keys
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max" in keys
    assert "model.audio_tower.layers.0.self_attn.q_proj.linear.weight" in keys


# ---------------------------------------------------------------------------------------------
# The checkpoint layout written down in serve/gemma4_layout.py


def test_base_config_has_the_checkpoint_keys_and_structure(demo: DemoPaths) -> None:
    config = json.loads((demo.base / "config.json").read_text())
    assert gemma4_layout.config_problems(config) == []
    assert gemma4_layout.structure_problems(config) == []


def test_base_tensors_are_the_checkpoint_tensors(demo: DemoPaths) -> None:
    """Every tensor name the checkpoint has and no other, the KV-shared layers' k/v projections and
    k_norm included (vLLM 0.23 refuses a checkpoint without k_norm there), each of its layer type's
    shape."""
    config = json.loads((demo.base / "config.json").read_text())
    keys = _keys(demo.base / "model.safetensors")
    expected = gemma4_layout.full_tensors(config)
    assert sorted(expected - set(keys)) == [] and sorted(set(keys) - expected) == []
    text = config["text_config"]
    shared = gemma4_layout.kv_shared_layers(text)
    assert len(shared) == text["num_kv_shared_layers"] >= 2
    for i in shared:
        like = text["layer_types"][: shared.start].index(text["layer_types"][i])  # same type, owns its KV
        for name in gemma4_layout.KV_SHARED_EXTRA:
            assert (
                keys[f"model.language_model.layers.{i}.{name}"]
                == keys[f"model.language_model.layers.{like}.{name}"]
            )


def test_config_reads_back_with_every_attribute_vllm_reads(demo: DemoPaths) -> None:
    """Loaded by transformers as vLLM loads it: each attribute vLLM's Gemma 4 code reads is there
    (vision ``default_output_length`` is not a transformers field, so a save_pretrained config lacks
    it), and the global layers' head dim comes from ``global_head_dim``."""
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(demo.base)
    raw_config = json.loads((demo.base / "config.json").read_text())

    def present(target: object, raw: dict[str, object], attr: str) -> bool:
        # transformers 5.14 (vLLM 0.23) keeps every key of config.json as an attribute; 5.19 moves
        # head_dim & co. into per_layer_config and refuses the global read.
        try:
            return attr in raw or hasattr(target, attr)
        except RuntimeError:  # AmbiguousGlobalPerLayerAttributeError: present, per layer
            return True

    for section, attrs in gemma4_layout.VLLM_READS.items():
        target = getattr(loaded, section) if section else loaded
        raw = raw_config[section] if section else raw_config
        missing = [a for a in attrs if not present(target, raw, a)]
        assert missing == [], f"{section or 'top level'}: {missing}"
        loaded_only = [a for a in attrs if a not in raw and not present(target, {}, a)]
        assert loaded_only == []
    text = loaded.text_config
    raw = raw_config["text_config"]
    for i, kind in enumerate(text.layer_types):
        want = raw["global_head_dim"] if kind == "full_attention" else raw["head_dim"]
        assert text.per_layer_config[i].head_dim == want
    assert loaded.vision_config.default_output_length == DEMO_SOFT_TOKENS


def test_layout_lists_every_field_of_transformers_gemma4_configs() -> None:
    """Whatever transformers' Gemma 4 config classes define is in the written-down layout."""
    import dataclasses

    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    classes = {"": Gemma4Config, "text_config": Gemma4TextConfig}
    classes |= {"vision_config": Gemma4VisionConfig, "audio_config": Gemma4AudioConfig}
    for section, cls in classes.items():
        fields = {f.name for f in dataclasses.fields(cls)} - gemma4_layout.GENERIC_KEYS
        layout = set(gemma4_layout.E4B_CONFIG[section] if section else gemma4_layout.E4B_CONFIG)
        # PreTrainedConfig's own fields (pad/bos/eos ids, ...) count where the checkpoint has them.
        base = (
            {f.name for f in dataclasses.fields(cls.__mro__[1])}
            if dataclasses.is_dataclass(cls.__mro__[1])
            else set()
        )
        assert sorted(fields - layout - base) == [], section or "top level"


def test_layout_is_what_transformers_builds_plus_the_kv_shared_extras(demo: DemoPaths) -> None:
    """The tensor list is not just what the factory writes: the model transformers builds from the
    demo's config.json has exactly its names, less the KV-shared extras it builds no module for."""
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    config = json.loads((demo.base / "config.json").read_text())
    model = Gemma4ForConditionalGeneration(AutoConfig.from_pretrained(demo.base))
    built = set(model.state_dict()) - {"lm_head.weight"}
    extras = {
        f"model.language_model.layers.{i}.{n}"
        for i in gemma4_layout.kv_shared_layers(config["text_config"])
        for n in gemma4_layout.KV_SHARED_EXTRA
    }
    assert built | extras == gemma4_layout.full_tensors(config) and not built & extras


def test_e4b_config_has_the_real_structure() -> None:
    e4b = gemma4_layout.E4B_CONFIG
    assert gemma4_layout.structure_problems(e4b) == []
    text = e4b["text_config"]
    assert (text["num_hidden_layers"], text["num_kv_shared_layers"], text["head_dim"]) == (42, 18, 256)
    assert e4b["vision_config"]["default_output_length"] == 280


@pytest.mark.parametrize("text_only", [False, True], ids=["full", "text-only"])
def test_merged_layouts_keep_the_checkpoint_layout(demo: DemoPaths, tmp_path: Path, text_only: bool) -> None:
    from merge_adapter import merge

    out = tmp_path / "merged"
    merge(demo.base, demo.adapter, out, dtype_name="fp32", text_only=text_only)
    config = json.loads((out / "config.json").read_text())
    keys = set(_keys(out / "model.safetensors"))
    base_config = json.loads((demo.base / "config.json").read_text())
    if text_only:
        assert gemma4_layout.config_problems(config, text_only=True) == []
        assert keys == gemma4_layout.text_tensors(base_config, prefix="model.")
    else:
        assert gemma4_layout.config_problems(config) == []
        assert gemma4_layout.structure_problems(config) == []
        assert keys == gemma4_layout.full_tensors(config)
        processor = json.loads((out / "processor_config.json").read_text())
        assert (
            processor["image_processor"]["max_soft_tokens"]
            == config["vision_config"]["default_output_length"]
        )


def test_processor_config_has_what_vllm_reads(demo: DemoPaths) -> None:
    processor = json.loads((demo.base / "processor_config.json").read_text())
    for section, keys in gemma4_layout.PROCESSOR_KEYS.items():
        have = processor[section] if section else processor
        assert [k for k in keys if k not in have] == [], section or "top level"
    config = json.loads((demo.base / "config.json").read_text())
    soft = config["vision_config"]["default_output_length"]
    assert processor["image_seq_length"] == processor["image_processor"]["max_soft_tokens"] == soft
    assert config["vision_soft_tokens_per_image"] == soft


def test_adapter_is_peft_format_with_monkey_patched_tower_names(demo: DemoPaths) -> None:
    config = json.loads((demo.adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 16)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    with safe_open(demo.adapter / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        b = f.get_tensor("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight")
    assert b.abs().max() > 0
    assert "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.audio_tower.layers.0.self_attn.k_proj.lora_B.weight" in keys
    assert not any(".linear.lora_" in k for k in keys)
    # No model has k/v projections on the KV-shared layers, so no adapter trains them.
    base = json.loads((demo.base / "config.json").read_text())["text_config"]
    for i in gemma4_layout.kv_shared_layers(base):
        assert not any(
            f".layers.{i}.self_attn.k_proj." in k or f".layers.{i}.self_attn.v_proj." in k for k in keys
        )


def test_factory_is_deterministic(tmp_path: Path, demo: DemoPaths) -> None:
    again = build_demo(tmp_path)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again.base / name) == digest(demo.base / name), name
    assert digest(again.adapter / "adapter_model.safetensors") == digest(
        demo.adapter / "adapter_model.safetensors"
    )


def test_tokenizer_has_gemma4_turns(demo: DemoPaths) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<bos><|turn>system\nS<turn|>\n<|turn>user\nU<turn|>\n<|turn>model\n"
    assert len(tok.convert_tokens_to_ids(["<|turn>"])) == 1 and tok.convert_tokens_to_ids("<turn|>") > 3


def test_full_layout_carries_what_gemma4_processor_loads(demo: DemoPaths) -> None:
    """vLLM serves the multimodal layout through transformers' Gemma4Processor: its media tokens
    come from the tokenizer, its audio/image/video settings from processor_config.json, and the
    image grid must match the vision tower's."""
    from transformers import AutoFeatureExtractor, AutoTokenizer
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    config = json.loads((demo.base / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    assert tokenizer.image_token_id == config["image_token_id"]
    assert tokenizer.audio_token_id == config["audio_token_id"]
    assert tokenizer.convert_tokens_to_ids(tokenizer.boi_token) == config["boi_token_id"]
    assert AutoFeatureExtractor.from_pretrained(demo.base).sampling_rate == 16_000
    image = Gemma4ImageProcessorPil.from_pretrained(demo.base)
    vision = config["vision_config"]
    assert (image.patch_size, image.pooling_kernel_size) == (
        vision["patch_size"],
        vision["pooling_kernel_size"],
    )
    processor = json.loads((demo.base / "processor_config.json").read_text())
    assert processor["processor_class"] == "Gemma4Processor"
    assert processor["video_processor"]["patch_size"] == vision["patch_size"]


@pytest.mark.parametrize("text_only", [False, True], ids=["full", "text-only"])
def test_gpu_stand_in_config_is_the_checkpoint_config(demo: DemoPaths, text_only: bool) -> None:
    """benchmarks/stand_in.py serves the real config's shapes with --load-format dummy: the
    checkpoint's keys and sizes, its own tokenizer's token ids."""
    from transformers import AutoTokenizer

    from benchmarks.stand_in import stand_in_config

    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    config = stand_in_config(tokenizer, 262144, text_only=text_only)
    assert gemma4_layout.config_problems(config, text_only=text_only) == []
    assert gemma4_layout.structure_problems(config) == []
    text = config if text_only else config["text_config"]
    assert (text["vocab_size"], text["hidden_size"], text["num_kv_shared_layers"]) == (262144, 2560, 18)
    if text_only:
        assert config["architectures"] == ["Gemma4ForCausalLM"]
    else:
        assert config["image_token_id"] == tokenizer.image_token_id
        assert config["vision_config"] == gemma4_layout.E4B_CONFIG["vision_config"]

"""The tiny factory writes the real google/gemma-4-E4B-it layout, deterministically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from serve.demo_model import DemoPaths, build_demo


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
    # KV-shared layers have no k/v projections of their own.
    last = text["num_hidden_layers"] - 1
    assert f"model.language_model.layers.{last}.self_attn.k_proj.weight" not in keys


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

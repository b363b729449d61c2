"""merge_adapter.py against PEFT: per tensor, per logit, and every refusal leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge_adapter
from serve.demo_model import DemoPaths
from tests.peft_oracle import load_base, peft_model


def _run(*args: str) -> int:
    return merge_adapter.main(list(args))


@pytest.fixture(scope="module")
def merged_full(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "full"
    assert (
        _run(
            "--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out), "--dtype", "fp32"
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def merged_text(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m") / "text"
    args = ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args, "--dtype", "fp32", "--text-only") == 0
    return out


def test_full_merge_equals_peft_merge_and_unload_per_tensor(demo: DemoPaths, merged_full: Path) -> None:
    reference = peft_model(demo.base, demo.adapter).merge_and_unload().state_dict()
    ours = load_file(merged_full / "model.safetensors")
    assert "lm_head.weight" not in ours
    reference.pop("lm_head.weight")  # tied to the embeddings, as in the base
    assert set(ours) == set(reference)
    base = load_file(demo.base / "model.safetensors")
    changed = 0
    for key, ref in reference.items():
        torch.testing.assert_close(ours[key], ref, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(ours[key], base[key].float())
    report = json.loads((merged_full / "merge_report.json").read_text())
    assert changed == len(report["merged"]) + len(report["merged_tower"]) > 0


def test_tower_lora_lands_on_real_linear_weight_and_keeps_clip_buffers(
    demo: DemoPaths, merged_full: Path
) -> None:
    report = json.loads((merged_full / "merge_report.json").read_text())
    assert report["merged_tower"] and all(k.endswith(".linear.weight") for k in report["merged_tower"])
    with safe_open(merged_full / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert float(f.get_tensor("model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max")) == 8.0
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "quantization_config" not in json.loads((merged_full / "config.json").read_text())
    # what vLLM's Gemma4Processor reads to serve this layout comes along unchanged
    assert (merged_full / "processor_config.json").read_bytes() == (
        demo.base / "processor_config.json"
    ).read_bytes()


def test_text_only_export_layout(merged_text: Path) -> None:
    config = json.loads((merged_text / "config.json").read_text())
    assert config["architectures"] == ["Gemma4ForCausalLM"] and config["model_type"] == "gemma4_text"
    keys = set(load_file(merged_text / "model.safetensors"))
    assert all(k.startswith("model.") and ".language_model." not in k for k in keys)
    assert not any("tower" in k or "embed_vision" in k for k in keys)
    report = json.loads((merged_text / "merge_report.json").read_text())
    assert report["skipped_tower"] and report["skipped_tower_max_abs_b"] > 0 and not report["merged_tower"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (merged_text / name).exists(), name
    assert not (merged_text / "processor_config.json").exists()  # text only: no media processors


def test_merged_logits_equal_unmerged_peft_logits(
    demo: DemoPaths, merged_full: Path, merged_text: Path
) -> None:
    from transformers import Gemma4ForCausalLM

    ids = torch.tensor([[2, 5, 40, 41, 300, 512, 77, 6, 5, 100]])
    with torch.no_grad():
        expected = peft_model(demo.base, demo.adapter)(input_ids=ids).logits
        base_only = load_base(demo.base)(input_ids=ids).logits
        full = load_base(merged_full)(input_ids=ids).logits
        text = (
            Gemma4ForCausalLM.from_pretrained(merged_text, dtype=torch.float32).eval()(input_ids=ids).logits
        )
    assert (expected - base_only).abs().max() > 1e-2  # the adapter matters, so the check means something
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, expected, atol=1e-4, rtol=1e-4)


def _adapter_copy(src: Path, dst: Path, *, config: dict | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        base = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if tensors is not None:
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _refusals(demo: DemoPaths, tmp: Path) -> dict[str, tuple[Path, str]]:
    lora = load_file(demo.adapter / "adapter_model.safetensors")
    q_a = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    wrong_shape = {**lora, q_a: torch.zeros(16, 7)}
    unknown = {
        **lora,
        "base_model.model.model.language_model.layers.0.self_attn.qkv.lora_A.weight": torch.zeros(16, 128),
        "base_model.model.model.language_model.layers.0.self_attn.qkv.lora_B.weight": torch.zeros(128, 16),
    }
    elsewhere = {
        k.replace("language_model.layers.0.", "language_model.layers.99."): v for k, v in lora.items()
    }
    return {
        "dora": (_adapter_copy(demo.adapter, tmp / "dora", config={"use_dora": True}), "DoRA"),
        "shape": (_adapter_copy(demo.adapter, tmp / "shape", tensors=wrong_shape), "q_proj"),
        "unknown-target": (_adapter_copy(demo.adapter, tmp / "unknown", tensors=unknown), "qkv"),
        "another-base": (_adapter_copy(demo.adapter, tmp / "other", tensors=elsewhere), "layers.99"),
        "not-lora": (_adapter_copy(demo.adapter, tmp / "ia3", config={"peft_type": "IA3"}), "IA3"),
        "rank-pattern": (
            _adapter_copy(demo.adapter, tmp / "rank", config={"rank_pattern": {"q_proj": 8}}),
            "r=8",
        ),
        "alora": (
            _adapter_copy(demo.adapter, tmp / "alora", config={"alora_invocation_tokens": [5, 6]}),
            "Activated LoRA",
        ),
        "lora-bias": (_adapter_copy(demo.adapter, tmp / "lbias", config={"lora_bias": True}), "lora_bias"),
        "missing": (tmp / "does-not-exist", "does-not-exist"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dora",
        "shape",
        "unknown-target",
        "another-base",
        "not-lora",
        "rank-pattern",
        "alora",
        "lora-bias",
        "missing",
    ],
)
def test_refusals_are_one_line_nonzero_and_leave_no_output(
    case: str, demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter, needle = _refusals(demo, tmp_path)[case]
    out = tmp_path / "out" / "merged"
    code = _run("--base", str(demo.base), "--adapter", str(adapter), "--output", str(out))
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.glob("*")] if out.parent.exists() else True


def test_existing_output_needs_overwrite(demo: DemoPaths, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep").write_text("x")
    args = ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out)]
    assert _run(*args) != 0 and (out / "keep").exists()
    assert _run(*args, "--overwrite") == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_hub_id_without_network_is_a_clear_error(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(
        "--base", "google/gemma-4-E4B-it", "--adapter", str(demo.adapter), "--output", str(tmp_path / "o")
    )
    err = capsys.readouterr().err
    assert code != 0 and "google/gemma-4-E4B-it" in err and len(err.strip().splitlines()) == 1

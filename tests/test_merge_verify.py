"""--verify (merged vs unmerged logits, no PEFT), its failure path, and --base-weights nf4."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_adapter
from serve.demo_model import DemoPaths


def _run(*args: str) -> int:
    return merge_adapter.main(list(args))


def _args(demo: DemoPaths, out: Path, *extra: str) -> list[str]:
    return ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out), *extra]


def test_verify_fp32_passes_and_is_recorded(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", "fp32", "--verify")) == 0
    assert "verified: fp32 logits within" in capsys.readouterr().out
    result = json.loads((out / "merge_report.json").read_text())["verification"]
    assert result["ok"] and result["within_fp32_tolerance"] and result["compute_dtype"] == "float32"
    assert result["prompts"] == 3 and result["positions"] > 100
    assert result["max_abs_logit_diff"] < 1e-4
    # The adapter moves the logits far more than the tolerance, so agreement is not vacuous.
    assert result["adapter_effect"]["max_abs_logit_diff"] > 1e-2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_verify_half_precision_reports_top1_and_kl(demo: DemoPaths, tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", dtype, "--verify", "--text-only")) == 0
    result = json.loads((out / "merge_report.json").read_text())["verification"]
    assert result["ok"] and result["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert result["top1_agreement"] >= 0.95
    assert 0 <= result["kl_mean"] <= result["criteria"]["max_kl_mean"] < result["adapter_effect"]["kl_mean"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_failed_verification_exits_nonzero_and_writes_nothing(
    demo: DemoPaths,
    tmp_path: Path,
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A merge bug (here: the LoRA delta added twice) is caught by --verify, the new output is
    thrown away and an existing one is left as it was."""
    right = merge_adapter.merged_tensor

    def doubled(weight: torch.Tensor, pair: merge_adapter.LoraPair, out: torch.dtype) -> torch.Tensor:
        return right(weight, merge_adapter.LoraPair(pair.module, pair.a, pair.b, 2 * pair.scale), out)

    monkeypatch.setattr(merge_adapter, "merged_tensor", doubled)
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")

    assert _run(*_args(demo, fresh, "--dtype", dtype, "--verify")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("merge_adapter: error: verification failed"), err
    assert not fresh.exists()

    assert _run(*_args(demo, existing, "--dtype", dtype, "--verify", "--overwrite")) != 0
    assert sorted(p.name for p in existing.iterdir()) == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no staging directory left


def test_quantized_base_is_refused_and_leaves_nothing(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    shutil.copytree(demo.base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized" in err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_nf4_base_weights(demo: DemoPaths, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", "fp32", "--base-weights", "nf4", "--verify")) == 0
    report = json.loads((out / "merge_report.json").read_text())
    base = load_file(demo.base / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    _, pairs = merge_adapter.load_adapter(demo.adapter)
    targets = merge_adapter.plan_targets(pairs, merge_adapter.base_index([demo.base / "model.safetensors"]))

    # What a 4-bit load quantizes: the language model's linears, i.e. its 2-D weights that are
    # not embeddings. Everything else stays as it was.
    linears = {
        k
        for k, v in base.items()
        if k.startswith("model.language_model.")
        and v.ndim == 2
        and "embed" not in k
        and k.endswith(".weight")
    }
    assert report["base_weights"] == "nf4" and report["nf4"]["tensors"] == len(linears) == 33
    assert 0.05 < report["nf4"]["weight_relative_error_mean"] < 0.15
    for key, weight in base.items():
        rounded = merge_adapter.nf4_roundtrip(weight).float() if key in linears else weight.float()
        if key in targets:
            pair = targets[key]
            rounded = rounded + pair.scale * (pair.b.float() @ pair.a.float())
            torch.testing.assert_close(merged[key], rounded, rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(merged[key], rounded), key

    result = report["verification"]
    assert result["ok"] and result["within_fp32_tolerance"] and "NF4" in result["reference"]
    drift = result["nf4_drift_from_plain_merge"]
    assert drift["max_abs_logit_diff"] > 1e-3 and drift["kl_mean"] > 0


def test_streaming_in_small_pieces_changes_nothing(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies, casts, merges and NF4 round trips all go through bounded buffers; with buffers far
    smaller than any tensor the output is the same."""
    args = ("--dtype", "fp32", "--base-weights", "nf4")
    assert _run(*_args(demo, tmp_path / "whole", *args)) == 0
    monkeypatch.setattr(merge_adapter, "CHUNK_VALUES", 1024)
    monkeypatch.setattr(merge_adapter, "CHUNK_BYTES", 4096)
    assert _run(*_args(demo, tmp_path / "pieces", *args)) == 0
    whole, pieces = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "pieces" / "model.safetensors"),
    )
    merged = set(json.loads((tmp_path / "whole" / "merge_report.json").read_text())["merged"])
    assert set(whole) == set(pieces) and merged
    for key, tensor in whole.items():
        if key in merged:
            torch.testing.assert_close(pieces[key], tensor, rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(pieces[key], tensor), key


def test_verify_without_a_tokenizer_is_a_one_line_error(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    shutil.copytree(demo.base, base, ignore=shutil.ignore_patterns("tokenizer*"))
    out = tmp_path / "merged"
    assert _run("--base", str(base), "--adapter", str(demo.adapter), "--output", str(out), "--verify") != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]

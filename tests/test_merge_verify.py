"""--verify (merged vs unmerged logits, no PEFT), its failure path, and --base-weights nf4."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import merge_adapter
from serve.demo_model import DemoPaths
from tests.peft_oracle import load_base


def _run(*args: str) -> int:
    return merge_adapter.main(list(args))


def _args(demo: DemoPaths, out: Path, *extra: str) -> list[str]:
    return ["--base", str(demo.base), "--adapter", str(demo.adapter), "--output", str(out), *extra]


def test_verify_fp32_passes_and_is_recorded(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", "fp32", "--verify")) == 0
    assert "verified: weights: 34 merged tensors equal" in (printed := capsys.readouterr().out)
    assert "logits: fp32 logits within" in printed
    result = json.loads((out / "merge_report.json").read_text())["verification"]
    assert result["ok"] and result["within_fp32_tolerance"] and result["compute_dtype"] == "float32"
    assert result["weights"]["ok"] and result["weights"]["merged_tensors"] == 34
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
    weights = result["weights"]
    assert weights["ok"] and weights["merged_tensors"] == 24 and weights["values_changed_by_delta"] > 10_000


# ---------------------------------------------------------------------------------------------
# Planted merge bugs: --verify must catch every one in the output dtype, whatever that is.


def _planted(kind: str) -> Any:
    """A merged_tensor with one bug. The merge hands it a block of rows of W and the same rows of
    B; CHUNK_VALUES is raised in the tests so that a block is the whole weight (the transposed
    delta needs all of B)."""
    right = merge_adapter.merged_tensor
    first_square = "model.language_model.layers.0.self_attn.q_proj"

    def planted(weight: torch.Tensor, pair: merge_adapter.LoraPair, out: torch.dtype) -> torch.Tensor:
        if kind in ("x0.95", "x1.05"):
            factor = float(kind[1:])
            return right(
                weight, merge_adapter.LoraPair(pair.module, pair.a, pair.b, factor * pair.scale), out
            )
        if kind == "dropped" and pair.module == first_square:
            return weight.to(out)
        if kind == "transposed" and pair.module == first_square:
            assert weight.shape[0] == weight.shape[1] == pair.b.shape[0]
            delta = pair.scale * (pair.b.float() @ pair.a.float())
            return (weight.float() + delta.T).to(out)
        if kind == "delta-rounded":  # the delta rounded to the output dtype before the add
            delta = (pair.scale * (pair.b.float() @ pair.a.float())).to(out)
            return (weight.float() + delta.float()).to(out)
        return right(weight, pair, out)

    return planted


PLANTED = ["x0.95", "x1.05", "dropped", "transposed", "delta-rounded"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind", PLANTED)
def test_verify_catches_planted_merge_bugs_in_every_dtype(
    demo: DemoPaths,
    tmp_path: Path,
    kind: str,
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 5% scale error, one module left out, one delta transposed: the logits in bf16 cannot
    tell these from rounding (a x0.75 scale passed them), the weights can."""
    if kind == "delta-rounded" and dtype == "fp32":
        pytest.skip("rounding the delta to fp32 is what a correct fp32 merge does")
    monkeypatch.setattr(merge_adapter, "merged_tensor", _planted(kind))
    monkeypatch.setattr(merge_adapter, "CHUNK_VALUES", 1 << 30)
    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", dtype, "--verify", "--text-only")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merge_adapter: error: verification failed: weights WRONG"), (
        err
    )
    if kind in ("dropped", "transposed"):
        assert "1 of 24 merged tensors" in err[0] and "layers.0.self_attn.q_proj" in err[0], err
    if kind.startswith("x"):
        assert "24 of 24 merged tensors" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_weight_rule_is_exact_rounding_of_the_fp64_merge(demo: DemoPaths, tmp_path: Path) -> None:
    """The bf16 merge equals round_to_bf16(fp64 W + fp64 scale * B @ A) but for values whose fp64
    result lies within the fp32 error bound of a rounding midpoint, and there it is one of the two
    neighbours; with the delta rounded to bf16 first, many values are not."""
    import verify_merge

    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", "bf16", "--text-only")) == 0
    merged = load_file(out / "model.safetensors")
    base = load_file(demo.base / "model.safetensors")
    _, pairs = merge_adapter.load_adapter(demo.adapter)
    exact = differ = 0
    for module, pair in pairs.items():
        if "language_model" not in module:
            continue
        w = base[f"{module}.weight"].double()
        reference = w + pair.scale * (pair.b.double() @ pair.a.double())
        got = merged["model." + module.removeprefix("model.language_model.") + ".weight"]
        differ += int((got != reference.to(torch.bfloat16)).sum())
        exact += got.numel()
        rounded_delta = w + (pair.scale * (pair.b.float() @ pair.a.float())).to(torch.bfloat16).double()
        assert int((got != (rounded_delta.to(torch.bfloat16))).sum()) > 100, module
    assert differ <= exact * 1e-4, (differ, exact)
    result = verify_merge.check_weights(
        demo.base,
        out,
        merge_adapter.plan_targets(pairs, merge_adapter.base_index([demo.base / "model.safetensors"])),
        out_dtype=torch.bfloat16,
        text_only=True,
    )
    assert result["ok"] and result["merged_tensors"] == 24, result["summary"]


def test_verify_catches_a_changed_copy_and_an_extra_tensor(demo: DemoPaths, tmp_path: Path) -> None:
    """Tensors the merge only copies must be the base's bit for bit; nothing may be added."""
    from safetensors.torch import save_file

    import verify_merge

    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", "bf16", "--text-only")) == 0
    _, pairs = merge_adapter.load_adapter(demo.adapter)
    targets = merge_adapter.plan_targets(pairs, merge_adapter.base_index([demo.base / "model.safetensors"]))
    tensors = load_file(out / "model.safetensors")
    norm = "model.layers.0.input_layernorm.weight"
    tensors[norm] = tensors[norm].clone()
    tensors[norm][0] += 1
    tensors["model.extra"] = torch.zeros(2)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    result = verify_merge.check_weights(demo.base, out, targets, out_dtype=torch.bfloat16, text_only=True)
    assert not result["ok"]
    assert result["problems"] == [
        f"{norm} is not the base's tensor, bit for bit",
        "model.extra is not in the base",
    ]


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

    # What a 4-bit load quantizes: the language model's linears, i.e. the 2-D weights transformers
    # loads (not the KV-shared layers' k/v, which it drops) that are not embeddings. Everything
    # else stays as it was.
    loaded = set(load_base(demo.base).state_dict())
    linears = {
        k
        for k, v in base.items()
        if k.startswith("model.language_model.")
        and v.ndim == 2
        and "embed" not in k
        and k.endswith(".weight")
        and k in loaded
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


def _scaled_pair(rank: int, delta_over_w: float, rows: int = 128, cols: int = 256) -> merge_adapter.LoraPair:
    a, b = torch.randn(rank, cols), torch.randn(rows, rank)
    return merge_adapter.LoraPair("m", a, b, delta_over_w / float((b @ a).abs().mean()))


@pytest.mark.parametrize(
    ("rank", "delta_over_w", "base", "out"),
    [
        (64, 1e-5, torch.bfloat16, torch.float32),
        (256, 1e-4, torch.bfloat16, torch.float32),
        (16, 1e-4, torch.float32, torch.bfloat16),
        (256, 1e-3, torch.float32, torch.bfloat16),
        (8, 1e-3, torch.bfloat16, torch.bfloat16),
    ],
)
def test_the_weight_rule_catches_5_percent_of_a_delta_small_next_to_w(
    rank: int, delta_over_w: float, base: torch.dtype, out: torch.dtype
) -> None:
    """|W| in [1, 2), deltas 1e-5..1e-3 of it, ranks up to 256: a x0.95 or x1.05 scale changes
    thousands of output values, and the rule must see them. With W's slack scaled by the rank
    (2(r+4)u|W|), every one of these passed."""
    import verify_merge

    torch.manual_seed(rank)
    weight = ((torch.rand(128, 256) + 1) * torch.randn(128, 256).sign()).to(base)
    pair = _scaled_pair(rank, delta_over_w)
    reference = (weight.double() + pair.scale * (pair.b.double() @ pair.a.double())).to(out)
    right = merge_adapter.merged_tensor(weight, pair, out)
    assert verify_merge._check_merged(weight, right, pair)["outside"] == 0
    for factor in (0.95, 1.05):
        wrong = merge_adapter.merged_tensor(weight, dataclasses.replace(pair, scale=factor * pair.scale), out)
        differ = int((wrong != reference).sum())
        outside = verify_merge._check_merged(weight, wrong, pair)["outside"]
        assert differ > 10 and outside >= differ // 2, (factor, outside, differ)


@pytest.mark.parametrize("rank", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
def test_the_weight_rule_passes_every_correct_merge(rank: int, out: torch.dtype) -> None:
    """Soundness: the merge's own rounding never leaves the rule's interval, whatever the rank,
    the dtype or the size of W next to the delta (zeros, subnormals, huge and tiny rows)."""
    import verify_merge

    torch.manual_seed(rank)
    weight = torch.randn(96, 200) * torch.logspace(-30, 3, 96)[:, None]
    weight[0] = 0.0
    weight[1] = 1e-40  # fp32 subnormal
    for delta_over_w in (1e-6, 1e-3, 1.0, 1e3):
        pair = _scaled_pair(rank, delta_over_w, 96, 200)
        for base in (torch.float32, torch.bfloat16):
            w = weight.to(base)
            result = verify_merge._check_merged(w, merge_adapter.merged_tensor(w, pair, out), pair)
            assert result["outside"] == 0, (delta_over_w, base, result)

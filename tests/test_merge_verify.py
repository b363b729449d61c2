"""--verify (merged vs unmerged logits, no PEFT), its failure path, and --base-weights nf4."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge_adapter
from merge import limits
from merge import write as merge_write
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
    monkeypatch.setattr(merge_write, "merged_tensor", _planted(kind))
    monkeypatch.setattr(limits, "CHUNK_VALUES", 1 << 30)
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

    monkeypatch.setattr(merge_write, "merged_tensor", doubled)
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
    monkeypatch.setattr(limits, "CHUNK_VALUES", 1024)
    monkeypatch.setattr(limits, "CHUNK_BYTES", 4096)
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


# ---------------------------------------------------------------------------------------------
# What the weight check must never let through: a row it skips, a looser slack, a NaN, a missing,
# retyped or changed tensor, and an index naming a tensor the shards do not hold.


@pytest.mark.parametrize("rows_per_block", [1, 7, 30])
def test_the_weight_rule_checks_every_row_of_every_block(
    rows_per_block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One wrong value, in any row of a 30-row weight checked in blocks of 1, 7 (the last block
    short) or all 30 rows, is seen."""
    import verify_merge

    monkeypatch.setattr(limits, "CHUNK_VALUES", rows_per_block * 40)
    torch.manual_seed(0)
    weight = torch.randn(30, 40).to(torch.bfloat16)
    pair = _scaled_pair(4, 1e-2, 30, 40)
    right = merge_adapter.merged_tensor(weight, pair, torch.float32)
    assert verify_merge._check_merged(weight, right, pair)["outside"] == 0
    for row in range(30):
        wrong = right.clone()
        wrong[row, row % 40] += 0.5
        assert verify_merge._check_merged(weight, wrong, pair)["outside"] == 1, row


def test_the_fp32_weight_slack_is_an_ulp_or_two() -> None:
    """A fp32 merge off by three times the rule's slack is outside it (a slack 10x looser is not).
    The slack is written out as WEIGHT_RULE states it, so that a change to merge_slack shows."""
    import verify_merge

    torch.manual_seed(1)
    weight = (torch.rand(64, 64) + 1) * torch.randn(64, 64).sign()
    pair = _scaled_pair(8, 1e-3, 64, 64)
    w, a, b = weight.double(), pair.a.double(), pair.b.double()
    reference = w + pair.scale * (b @ a)
    slack = 2.0**-23 * (w.abs() + 12 * abs(pair.scale) * (b.abs() @ a.abs())) + 12 * 2.0**-149
    off = (reference + 3 * slack).to(torch.float32)
    assert verify_merge._check_merged(weight, off, pair)["outside"] == off.numel()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_weight_rule_never_passes_a_non_finite_value(value: float) -> None:
    """NaN or inf in B makes the reference non-finite; the merge's output is then non-finite too,
    and equal to nothing: both outside the rule, not 'the same NaN'."""
    import verify_merge

    torch.manual_seed(2)
    weight = torch.randn(16, 32)
    pair = _scaled_pair(4, 1e-2, 16, 32)
    pair.b[3, 1] = value
    merged = merge_adapter.merged_tensor(weight, pair, torch.float32)
    assert not bool(torch.isfinite(merged).all())
    assert verify_merge._check_merged(weight, merged, pair)["outside"] == 32  # row 3, every column


def test_the_weight_rule_never_passes_an_overflow_to_infinity() -> None:
    """W + delta just above fp16's largest value (65504) rounds to inf, and so do both ends of the
    rule's interval: only the finiteness of the output keeps an overflowed weight out."""
    import verify_merge

    weight = torch.full((2, 4), 65000.0)
    pair = merge_adapter.LoraPair("m", torch.ones(1, 4), torch.ones(2, 1), 600.0)
    merged = merge_adapter.merged_tensor(weight, pair, torch.float16)
    assert bool(torch.isinf(merged).all())
    assert verify_merge._check_merged(weight, merged, pair)["outside"] == 8


def test_the_weight_rule_holds_for_a_negative_scale() -> None:
    """lora_alpha may be negative (PEFT takes any number): the slack is built from |scale|."""
    import verify_merge

    torch.manual_seed(3)
    weight = torch.randn(32, 48)
    pair = dataclasses.replace(_scaled_pair(8, 1e-2, 32, 48), scale=-0.37)
    for out in (torch.float32, torch.bfloat16):
        right = merge_adapter.merged_tensor(weight, pair, out)
        assert verify_merge._check_merged(weight, right, pair)["outside"] == 0
        assert verify_merge._check_merged(weight, right, dataclasses.replace(pair, scale=0.37))["outside"] > 0


def test_verify_fails_on_a_cast_beyond_the_dtypes_range_even_past_the_refusal(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The merge refuses a bf16 value of 1e6 cast to fp16; were that refusal gone, the inf it
    writes is the cast, bit for bit, and --verify must still fail it."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(demo.base, base)
    name = "model.language_model.norm.weight"
    weights = load_file(base / "model.safetensors")
    weights[name] = weights[name].clone()
    weights[name][3] = 1e6
    save_file(weights, base / "model.safetensors", {"format": "pt"})
    monkeypatch.setattr(merge_write, "cast", lambda item, source: source.to(torch.float16))
    args = ["--base", str(base), "--adapter", str(demo.adapter), "--output", str(tmp_path / "merged")]
    assert _run(*args, "--dtype", "fp16", "--verify", "--text-only") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verification failed" in err[0] and "beyond F16's range" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_verify_that_transformers_cannot_load_is_one_line(
    demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever transformers objects to while --verify loads a model (memory, a config it rejects)
    is one line and exit 2, and the merge it was checking is not left behind."""
    import transformers

    def refuse(*_: object, **__: object) -> None:
        raise ValueError("the checkpoint's config is not one this transformers reads\nmore detail")

    model_class = transformers.Gemma4ForCausalLM
    monkeypatch.setattr(model_class, "from_pretrained", refuse)
    assert _run(*_args(demo, tmp_path / "merged", "--verify", "--text-only")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verification: transformers cannot load" in err[0], err
    assert "config is not one this transformers reads" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verify_fails_on_a_nan_in_the_adapter_even_past_the_refusal(
    demo: DemoPaths,
    tmp_path: Path,
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """load_adapter refuses a NaN; were that refusal gone, --verify must still fail (before, a NaN
    in lora_B passed fp32 --verify)."""
    right = merge_adapter.load_adapter

    def with_nan(adapter: Path) -> Any:
        config, pairs = right(adapter)
        pairs["model.language_model.layers.0.self_attn.q_proj"].b[0, 0] = float("nan")
        return config, pairs

    monkeypatch.setattr(merge_adapter, "load_adapter", with_nan)
    monkeypatch.setattr(merge_write, "_finite", lambda _, tensor: tensor)  # and the write's check too
    assert _run(*_args(demo, tmp_path / "merged", "--dtype", dtype, "--verify", "--text-only")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verification failed: weights WRONG" in err[0] and "q_proj" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_verify_catches_a_changed_copy_a_missing_a_retyped_and_an_extra_tensor(
    demo: DemoPaths, tmp_path: Path, dtype: str
) -> None:
    """Copied tensors (bf16: the base's bits; fp32: cast from the bf16 base) must be the base's
    bit for bit, none may be missing, in another dtype or added."""
    from safetensors.torch import save_file

    import verify_merge

    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", dtype, "--text-only")) == 0
    _, pairs = merge_adapter.load_adapter(demo.adapter)
    targets = merge_adapter.plan_targets(pairs, merge_adapter.base_index([demo.base / "model.safetensors"]))
    tensors = load_file(out / "model.safetensors")
    changed, missing, retyped = (
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.input_layernorm.weight",
    )
    tensors[changed] = tensors[changed].clone()
    tensors[changed][0] += 1
    del tensors[missing]
    other = torch.float16 if dtype == "fp32" else torch.float32
    tensors[retyped] = tensors[retyped].to(other)
    tensors["model.extra"] = torch.zeros(2)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    out_dtype = merge_adapter.DTYPES[dtype]
    result = verify_merge.check_weights(demo.base, out, targets, out_dtype=out_dtype, text_only=True)
    want, got = {"bf16": "BF16", "fp32": "F32"}[dtype], {"bf16": "F32", "fp32": "F16"}[dtype]
    shape = tuple(tensors[retyped].shape)
    assert not result["ok"]
    assert result["problems"] == [
        f"{changed} is not the base's tensor, bit for bit",
        f"{missing} is missing",
        f"{retyped} is {got} {shape}, not {want} {shape}",
        "model.extra is not in the base",
    ]


def test_verify_reads_the_merged_index_as_the_truth(demo: DemoPaths, tmp_path: Path) -> None:
    import verify_merge

    out = tmp_path / "merged"
    assert _run(*_args(demo, out, "--dtype", "bf16", "--text-only")) == 0
    with safe_open(out / "model.safetensors", framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    index = {"metadata": {}, "weight_map": {**weight_map, "model.lost.weight": "model.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _, pairs = merge_adapter.load_adapter(demo.adapter)
    targets = merge_adapter.plan_targets(pairs, merge_adapter.base_index([demo.base / "model.safetensors"]))
    result = verify_merge.check_weights(demo.base, out, targets, out_dtype=torch.bfloat16, text_only=True)
    assert not result["ok"] and "'model.lost.weight'" in result["problems"][0], result["problems"]


# ---------------------------------------------------------------------------------------------
# The logits verdict: its fp32 tolerance, the half-precision judge's two conditions, NaN.


def _logits(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 50, generator=gen) for _ in range(2)]


@pytest.mark.parametrize(("factor", "ok"), [(0.5, True), (1.5, False), (3.0, False)])
def test_the_fp32_logit_tolerance_is_atol_plus_rtol(factor: float, ok: bool) -> None:
    """|m - r| <= 1e-4 + 1e-4 * |r| (PEFT's own merge tests' atol and rtol) and no more: 1.5 times
    that fails (a tolerance 10x looser would pass it)."""
    import verify_merge

    reference = _logits()
    merged = [r + factor * (1e-4 + 1e-4 * r.abs()) for r in reference]
    metrics = verify_merge.compare(merged, reference)
    assert metrics["within_fp32_tolerance"] is ok
    assert verify_merge.judge(metrics, 1.0, torch.float32)[0] is ok


def test_the_half_precision_judge_needs_top1_and_kl_both() -> None:
    import verify_merge

    good = {"positions": 10, "finite": True, "top1_agreement": 1.0, "kl_mean": 1e-4, "kl_max": 1e-3}
    assert verify_merge.judge(good, 1e-2, torch.bfloat16)[0]
    assert not verify_merge.judge({**good, "top1_agreement": 0.5}, 1e-2, torch.bfloat16)[0]
    assert not verify_merge.judge({**good, "kl_mean": 5e-3}, 1e-2, torch.bfloat16)[0]
    assert not verify_merge.judge({**good, "kl_mean": float("nan")}, 1e-2, torch.bfloat16)[0]
    assert not verify_merge.judge(good, float("nan"), torch.bfloat16)[0]


@pytest.mark.parametrize("where", ["merged", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_logit_verdict_fails_on_a_non_finite_logit(where: str, value: float) -> None:
    """Python's max() keeps a NaN only when it comes first; the verdict must see one anywhere."""
    import verify_merge

    reference = _logits()
    merged = [r.clone() for r in reference]
    (merged if where == "merged" else reference)[1][3, 7] = value
    metrics = verify_merge.compare(merged, reference)
    assert not metrics["finite"] and not metrics["within_fp32_tolerance"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ok, summary = verify_merge.judge(metrics, 1.0, dtype)
        assert not ok and "NaN or infinite" in summary, summary

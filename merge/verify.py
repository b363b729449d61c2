"""Check a merged checkpoint against its base and adapter, in two independent ways (--verify).

The expected LoRA scale of every module is derived apart from the merge (merge/scales.py: PEFT's
own resolution where PEFT is installed, else a second reading of adapter_config.json); a module
the merge scaled otherwise is reported by name, and its weights are checked against the expected
scale, not the merge's.

First, weight by weight (exact, and cheap next to loading a model): every merged tensor must be
W + scale * B @ A computed in fp64 and rounded to the output dtype, within the only slack a correct
fp32 merge has (see WEIGHT_RULE); every other tensor must be the base's, bit for bit (cast to the
output dtype, NF4 round-tripped with ``--base-weights nf4``); no tensor may be missing or extra,
and the output's index must name only tensors its shards hold. A wrong scale, a dropped,
transposed or misplaced delta, or a delta rounded before the add changes values the output dtype
can represent, and fails here whatever the dtype. A value that is NaN or infinite, in the output
or in the reference, is never within the rule. When the weights fail, the logits are not computed.

Second, the logits, end to end (merge/logits.py).
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge import limits
from merge.layout import output_name
from merge.logits import VERIFY_TEXTS, verify_logits
from merge.lora import LoraPair
from merge.nf4 import nf4_roundtrip
from merge.safetensors_io import (
    CASTABLE,
    ST_DTYPES,
    ST_NAME,
    Entry,
    base_index,
    index_problems,
    read_exactly,
    read_tensor,
    tensor_bytes,
    weight_files,
)
from merge.scales import expected_scales

# WEIGHT_RULE. merged_tensor computes v = fl32(W + fl32(fl32(scale) * fl32(B @ A))): a GEMM of inner
# dimension r, then one multiply, then one add, in that order. Whatever order a BLAS sums the GEMM
# in, with or without FMA, |fl32(B @ A) - B @ A| <= gamma_r * |B| @ |A| (Higham, Accuracy and
# Stability of Numerical Algorithms, 3.1 and 3.5, gamma_n = n*u / (1 - n*u), u = 2^-24); the scale's
# rounding and the multiply add two more u's, and the final add one u of |W + delta|. So
# |v - exact| <= u * |W| + gamma_(r+3) * |scale| * |B| @ |A|, and the slack below is twice that
# (which also covers the fp64 reference's own error), plus (r + 4) times the smallest fp32
# subnormal for underflow. W appears with u alone, not with r*u: it is rounded once, so even a
# delta a million times smaller than W is checked to within an ulp or two of fp32. The output is
# v rounded to its dtype, and rounding is monotone, so a correct merge lies in
# [round(ref - e), round(ref + e)], ref being the fp64 value and e that bound. Nothing else is
# allowed: for bf16 the interval is one value except where ref lies within e of a rounding
# midpoint, so the rule is "equal to the correctly rounded fp64 merge" for all but a few values in
# ten thousand (measured: 5e-5 at rank 16, 2e-4 at rank 64), and any scale error that moves a value
# across a midpoint by more than e fails it.
FP32_U = 2.0**-24
FP32_TINY = 2.0**-149


def merge_slack(w_abs: torch.Tensor, lora_abs: torch.Tensor, rank: int) -> torch.Tensor:
    """Twice the bound on |fp32 merge - exact| (see WEIGHT_RULE), given |W| and |scale|*|B|@|A|."""
    return 2 * FP32_U * (w_abs + (rank + 4) * lora_abs) + (rank + 4) * FP32_TINY


def nan_max(values: Iterable[float], default: float = 0.0) -> float:
    """max() that returns NaN when any value is NaN (Python's max() drops a NaN unless it is first)."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=default)


def _check_merged(weight: torch.Tensor, merged: torch.Tensor, pair: LoraPair) -> dict[str, Any]:
    """``merged`` against W + scale * B @ A in fp64, by WEIGHT_RULE, a block of rows at a time."""
    dtype = merged.dtype
    a = pair.a.to(torch.float64)
    a_abs, scale = a.abs(), pair.scale
    rows = max(1, limits.CHUNK_VALUES // max(1, weight.shape[1]))
    outside = visible = 0
    error_sq = delta_sq = 0.0
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].to(torch.float64)
        b = pair.b[start : start + rows].to(torch.float64)
        delta = scale * (b @ a)
        reference = w + delta
        slack = merge_slack(w.abs(), abs(scale) * (b.abs() @ a_abs), a.shape[0])
        low, high = (reference - slack).to(dtype), (reference + slack).to(dtype)
        got = merged[start : start + rows]
        # A NaN bound or value fails both comparisons, so it counts as outside; infinities are
        # outside too (a weight that overflowed, or the merge of an infinite input, is no weight).
        wrong = ~((got >= low) & (got <= high)) | ~torch.isfinite(got) | ~torch.isfinite(reference)
        outside += int(wrong.sum())
        visible += int((reference.to(dtype) != w.to(dtype)).sum())
        error_sq += float((got.to(torch.float64) - reference).square().sum())
        delta_sq += float(delta.square().sum())
    return {
        "values": weight.numel(),
        "outside": outside,
        "changed_by_delta": visible,
        "delta_relative_error": (error_sq / delta_sq) ** 0.5 if delta_sq > 0 else 0.0,
    }


def _copy_problem(src: io.RawIOBase, out: io.RawIOBase, entry: Entry, out_entry: Entry) -> str | None:
    """A copied or cast tensor: the base's values cast to the output dtype, bit for bit, streamed,
    and none of them finite in the base and infinite in the output (a cast beyond the dtype's range
    is a faithful cast of a value the model no longer has)."""
    itemsize, source_dtype = ST_DTYPES[entry.dtype]
    out_itemsize = ST_DTYPES[out_entry.dtype][0]
    step = max(limits.CHUNK_BYTES // itemsize, 1)
    for first in range(0, math.prod(entry.shape), step):
        count = min(step, math.prod(entry.shape) - first)
        chunk = read_exactly(src, entry.start + first * itemsize, count * itemsize)
        got = read_exactly(out, out_entry.start + first * out_itemsize, count * out_itemsize)
        if entry.dtype != out_entry.dtype:
            source = torch.frombuffer(chunk, dtype=source_dtype)
            cast = source.to(ST_DTYPES[out_entry.dtype][1])
            # Most chunks are all finite, which their largest magnitude shows in one cheap pass.
            finite = cast.numel() == 0 or math.isfinite(float(cast.abs().amax()))
            if not finite and not bool((torch.isfinite(cast) | ~torch.isfinite(source)).all()):
                return f"{out_entry.name} holds values beyond {out_entry.dtype}'s range"
            chunk = bytearray(tensor_bytes(cast).numpy().tobytes())
        if chunk != got:
            return f"{out_entry.name} is not the base's tensor, bit for bit"
    return None


def check_weights(
    base: Path,
    merged: Path,
    targets: Mapping[str, LoraPair],
    *,
    out_dtype: torch.dtype | None,
    text_only: bool,
    nf4_names: Sequence[str] = (),
) -> dict[str, Any]:
    """Every tensor of ``merged`` against the base and the adapter (see the module docstring)."""
    out_index = base_index(weight_files(merged, "merged"))
    problems: list[str] = index_problems(merged, out_index, "merged")
    nf4 = set(nf4_names)
    results: dict[str, dict[str, Any]] = {}
    others = 0
    files: dict[Path, io.RawIOBase] = {}
    try:
        for file in weight_files(base):
            for entry in sorted(base_index([file]).values(), key=lambda e: e.start):
                name = output_name(entry.name, text_only)
                if name is None:
                    continue
                out_entry = out_index.pop(name, None)
                if out_entry is None:
                    problems.append(f"{name} is missing")
                    continue
                want = (
                    ST_NAME[out_dtype] if out_dtype is not None and entry.dtype in CASTABLE else entry.dtype
                )
                if (out_entry.dtype, out_entry.shape) != (want, entry.shape):
                    problems.append(
                        f"{name} is {out_entry.dtype} {out_entry.shape}, not {want} {entry.shape}"
                    )
                    continue
                for path in (entry.file, out_entry.file):
                    if path not in files:
                        files[path] = path.open("rb", buffering=0)
                src, out = files[entry.file], files[out_entry.file]
                if entry.name in targets or entry.name in nf4:
                    weight = read_tensor(src, entry)
                    if entry.name in nf4:
                        weight = nf4_roundtrip(weight)
                    got = read_tensor(out, out_entry)
                    if entry.name in targets:
                        results[name] = _check_merged(weight, got, targets[entry.name])
                        if results[name]["outside"]:
                            continue
                    elif not torch.equal(tensor_bytes(weight.to(got.dtype)), tensor_bytes(got)):
                        problems.append(f"{name} is not the base's NF4 round trip")
                    del weight, got
                elif (problem := _copy_problem(src, out, entry, out_entry)) is not None:
                    problems.append(problem)
                others += entry.name not in targets
    finally:
        for f in files.values():
            f.close()
    problems += [f"{name} is not in the base" for name in sorted(out_index)]
    return _weights_verdict(results, problems, others, out_dtype)


def _weights_verdict(
    results: Mapping[str, Mapping[str, Any]],
    problems: Sequence[str],
    others: int,
    out_dtype: torch.dtype | None,
) -> dict[str, Any]:
    dtype = "its dtype" if out_dtype is None else str(out_dtype).removeprefix("torch.")
    wrong = {name: r for name, r in results.items() if r["outside"]}
    values = sum(r["values"] for r in results.values())
    visible = sum(r["changed_by_delta"] for r in results.values())
    if wrong:
        name, worst = max(wrong.items(), key=lambda item: item[1]["outside"] / item[1]["values"])
        problems = [
            f"{len(wrong)} of {len(results)} merged tensors are not W + scale*B@A rounded to {dtype} "
            f"(worst {name}: {worst['outside']} of {worst['values']} values outside the rounding rule, "
            f"delta off by {worst['delta_relative_error']:.1%})",
            *problems,
        ]
    ok = not problems
    summary = (
        f"weights: {len(results)} merged tensors equal W + scale*B@A (fp64) rounded to {dtype} "
        f"(the deltas change {visible} of {values} values), {others} others are the base's bit for bit"
        if ok
        else f"weights WRONG: {'; '.join(problems[:3])}"
        + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    )
    return {
        "ok": ok,
        "summary": summary,
        "rule": "fp64 W + scale*B@A, rounded; slack 2^-23*(|W| + (r+4)|scale||B||A|) before rounding",
        "merged_tensors": len(results),
        "other_tensors": others,
        "values_changed_by_delta": visible,
        "max_delta_relative_error": nan_max(r["delta_relative_error"] for r in results.values()),
        "problems": list(problems),
    }


def with_expected_scales(
    adapter: Path, targets: Mapping[str, LoraPair]
) -> tuple[dict[str, LoraPair], list[str], str]:
    """``targets`` with each pair's scale replaced by the one derived apart from the merge, the
    modules whose merge scale differs from it, and where the expected scales came from."""
    expected, source = expected_scales(adapter, sorted({pair.module for pair in targets.values()}))
    problems = [
        f"{pair.module} was merged with scale {pair.scale:.6g}, but {source} gives {expected[pair.module]:.6g}"
        for pair in sorted({p.module: p for p in targets.values()}.values(), key=lambda p: p.module)
        if not math.isclose(pair.scale, expected[pair.module], rel_tol=1e-12, abs_tol=0.0)
    ]
    checked = {key: dataclasses.replace(pair, scale=expected[pair.module]) for key, pair in targets.items()}
    return checked, problems, source


def verify(
    base: Path,
    merged: Path,
    adapter: Path,
    targets: Mapping[str, LoraPair],
    *,
    compute_dtype: torch.dtype,
    nf4_weights: Mapping[str, torch.dtype] | None = None,
    texts: Sequence[str] = VERIFY_TEXTS,
    out_dtype: torch.dtype | None = None,
    text_only: bool = False,
) -> dict[str, Any]:
    """The scales, then the weights by WEIGHT_RULE, then (when they pass) merged vs unmerged
    logits; returns the verdict and the numbers for merge_report.json. ``targets`` gives the
    LoRA factors and where each was merged; its scales are the merge's, and are checked, not used."""
    started = time.perf_counter()
    checked, scale_problems, source = with_expected_scales(adapter, targets)
    weights = check_weights(
        base, merged, checked, out_dtype=out_dtype, text_only=text_only, nf4_names=sorted(nf4_weights or {})
    )
    weights["scale_source"] = source
    if scale_problems:
        weights["problems"] = [*scale_problems, *weights["problems"]]
        more = f"; and {len(scale_problems) - 1} more modules" if len(scale_problems) > 1 else ""
        weights["ok"] = False
        weights["summary"] = f"scales WRONG: {scale_problems[0]}{more}; {weights['summary']}"
    if not weights["ok"]:
        return {
            "ok": False,
            "summary": weights["summary"],
            "weights": weights,
            "seconds": round(time.perf_counter() - started, 3),
        }
    result = verify_logits(base, merged, checked, compute_dtype, nf4_weights, texts)
    result["ok"] = result["ok"] and weights["ok"]
    result["summary"] = f"{weights['summary']}; logits: {result['summary']}"
    result["weights"] = weights
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result

"""Check a merged checkpoint against its base and adapter, without PEFT, in two independent ways.

First, weight by weight (exact, and cheap next to loading a model): every merged tensor must be
W + scale * B @ A computed in fp64 and rounded to the output dtype, within the only slack a correct
fp32 merge has (see WEIGHT_RULE); every other tensor must be the base's, bit for bit (cast to the
output dtype, NF4 round-tripped with ``--base-weights nf4``); no tensor may be missing or extra. A
wrong scale, a dropped, transposed or misplaced delta, or a delta rounded before the add changes
values the output dtype can represent, and fails here whatever the dtype. When the weights fail,
the logits are not computed.

Second, the logits, end to end (what the checkpoint's config and layout make of those weights). The
reference is the base model with each LoRA pair attached as a forward hook on the linear layer
it targets, computing what PEFT's unmerged LoRA layer computes: ``out + scale * B(A(x))`` in fp32,
added to the layer's output and rounded back to its dtype. Both models run, one after the other
(only one is in memory at a time), on the model card's prompt around a few endpoint texts.

* fp32 output: every logit must agree within atol = rtol = 1e-4 (as PEFT's own merge tests).
* bf16 / fp16 output: both models run in that dtype. The top-1 agreement must reach 95% and the
  mean KL divergence of the merged model's next-token distribution from the reference's must stay
  under a tenth of the adapter's own effect (the KL of the base alone from the reference). This
  is a gross-error alarm only: half-precision activations make the two models differ by more than
  a few-percent scale error does (x0.75 scored KL 1.2e-3 against a bound of 1.6e-3), which is why
  the weights are checked exactly first.
* with ``--base-weights nf4`` the reference's language-model linears are NF4 round-tripped as
  well, and the logit drift from the plain (unquantized) merge is reported too.

Text prompts exercise the language model only; tower merges are checked tensor by tensor in the
tests, not here.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge_adapter import (
    CASTABLE,
    CHUNK_BYTES,
    CHUNK_VALUES,
    ST_DTYPES,
    ST_NAME,
    Entry,
    LoraPair,
    MergeError,
    _read_exactly,
    _read_tensor,
    base_index,
    nf4_roundtrip,
    output_name,
    weight_files,
)

# The model card's example inputs, short to long.
VERIFY_TEXTS = (
    "Body height",
    "Progression-Free Survival (PFS) assessed by RECIST v1.1 using CT scan at 24 weeks",
    "Number of participants achieving CR and PR by 4 months as per IWG 2023 criteria | "
    "[Time Frame: Through 4 months after starting treatment]",
)
FP32_ATOL = FP32_RTOL = 1e-4
# bf16 / fp16: on the demo model, rounding the merged weights moves the next-token distribution by
# well under 1% of what the adapter itself moves it (KL 6e-5 vs 1.6e-2); a wrong scale moves it by
# about as much as the adapter. The floor keeps an adapter that changes (almost) nothing passable.
MIN_TOP1_AGREEMENT = 0.95
MAX_KL_SHARE_OF_ADAPTER = 0.1
MIN_KL_BOUND = 1e-6


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


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _check_merged(weight: torch.Tensor, merged: torch.Tensor, pair: LoraPair) -> dict[str, Any]:
    """``merged`` against W + scale * B @ A in fp64, by WEIGHT_RULE, a block of rows at a time."""
    dtype = merged.dtype
    a = pair.a.to(torch.float64)
    a_abs, scale = a.abs(), pair.scale
    rows = max(1, CHUNK_VALUES // max(1, weight.shape[1]))
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
        wrong = ~((got >= low) & (got <= high)) & ~(reference.isnan() & got.isnan())
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


def _same_bits(src: Any, out: Any, entry: Entry, out_entry: Entry) -> bool:
    """A copied or cast tensor: the base's values cast to the output dtype, bit for bit, streamed."""
    itemsize, source_dtype = ST_DTYPES[entry.dtype]
    out_itemsize = ST_DTYPES[out_entry.dtype][0]
    step = max(CHUNK_BYTES // itemsize, 1)
    for first in range(0, math.prod(entry.shape), step):
        count = min(step, math.prod(entry.shape) - first)
        chunk = _read_exactly(src, entry.start + first * itemsize, count * itemsize)
        got = _read_exactly(out, out_entry.start + first * out_itemsize, count * out_itemsize)
        if entry.dtype != out_entry.dtype:
            cast = torch.frombuffer(chunk, dtype=source_dtype).to(ST_DTYPES[out_entry.dtype][1])
            chunk = bytearray(_bits(cast).numpy().tobytes())
        if chunk != got:
            return False
    return True


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
    out_index = base_index(weight_files(merged))
    nf4 = set(nf4_names)
    problems: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    others = 0
    files: dict[Path, Any] = {}
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
                    weight = _read_tensor(src, entry)
                    if entry.name in nf4:
                        weight = nf4_roundtrip(weight)
                    got = _read_tensor(out, out_entry)
                    if entry.name in targets:
                        results[name] = _check_merged(weight, got, targets[entry.name])
                        if results[name]["outside"]:
                            continue
                    elif not torch.equal(_bits(weight.to(got.dtype)), _bits(got)):
                        problems.append(f"{name} is not the base's NF4 round trip")
                    del weight, got
                elif not _same_bits(src, out, entry, out_entry):
                    problems.append(f"{name} is not the base's tensor, bit for bit")
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
        "max_delta_relative_error": max((r["delta_relative_error"] for r in results.values()), default=0.0),
        "problems": list(problems),
    }


def prompt_ids(tokenizer_dir: Path, texts: Sequence[str] = VERIFY_TEXTS) -> list[list[int]]:
    from transformers import AutoTokenizer

    from client.prompt import build_messages

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means the same thing here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MergeError(
            f"verification needs the base's tokenizer ({type(exc).__name__}: {reason})"
        ) from None
    ids = []
    for text in texts:
        if tokenizer.chat_template:
            prompt = tokenizer.apply_chat_template(
                build_messages(text), tokenize=False, add_generation_prompt=True
            )
            ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(text)["input_ids"])
    return ids


def load_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    architecture = (json.loads((path / "config.json").read_text()).get("architectures") or [""])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise MergeError(f"verification: architecture {architecture!r} of {path} is unknown to transformers")
    return model_class.from_pretrained(path, dtype=dtype).eval()


def attach_lora(model: torch.nn.Module, targets: Mapping[str, LoraPair]) -> list[Any]:
    """Hook every targeted linear layer so that it adds its LoRA term, as PEFT's unmerged layer."""
    handles = []
    for key, pair in targets.items():
        name = key.removesuffix(".weight")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MergeError(f"verification: the base model has no module {name!r}") from None
        if not isinstance(module, torch.nn.Linear):
            raise MergeError(f"verification: {name!r} is a {type(module).__name__}, not a linear layer")
        a, b, scale = pair.a.float(), pair.b.float(), pair.scale

        def add_lora(_: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor, a=a, b=b, scale=scale):
            lora = torch.nn.functional.linear(torch.nn.functional.linear(args[0].float(), a), b) * scale
            return (out + lora).to(out.dtype)

        handles.append(module.register_forward_hook(add_lora))
    return handles


@torch.no_grad()
def logits(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]


def compare(merged: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Per-position agreement of two models' logits over the same prompts."""
    max_abs, worst_excess, kls, agree = 0.0, float("-inf"), [], 0
    for m, r in zip(merged, reference, strict=True):
        diff = (m - r).abs()
        max_abs = max(max_abs, float(diff.max()))
        worst_excess = max(worst_excess, float((diff - FP32_RTOL * r.abs()).max()))
        log_r, log_m = torch.log_softmax(r.double(), -1), torch.log_softmax(m.double(), -1)
        kls.append((log_r.exp() * (log_r - log_m)).sum(-1).clamp_min(0.0))
        agree += int((m.argmax(-1) == r.argmax(-1)).sum())
    kl = torch.cat(kls)
    return {
        "positions": int(kl.numel()),
        "max_abs_logit_diff": max_abs,
        "within_fp32_tolerance": worst_excess <= FP32_ATOL,
        "top1_agreement": agree / kl.numel(),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def judge(metrics: Mapping[str, Any], adapter_kl: float, compute_dtype: torch.dtype) -> tuple[bool, str]:
    n = metrics["positions"]
    if compute_dtype == torch.float32:
        ok = bool(metrics["within_fp32_tolerance"])
        verdict = "within" if ok else "NOT within"
        return ok, (
            f"fp32 logits {verdict} atol=rtol={FP32_ATOL:g} of the unmerged adapter's "
            f"(max |diff| {metrics['max_abs_logit_diff']:.2e} over {n} positions)"
        )
    kl_bound = max(MAX_KL_SHARE_OF_ADAPTER * adapter_kl, MIN_KL_BOUND)
    ok = metrics["top1_agreement"] >= MIN_TOP1_AGREEMENT and metrics["kl_mean"] <= kl_bound
    return ok, (
        f"{str(compute_dtype).removeprefix('torch.')}: top-1 agreement {metrics['top1_agreement']:.1%} "
        f"(>= {MIN_TOP1_AGREEMENT:.0%}), mean KL {metrics['kl_mean']:.2e} (<= {kl_bound:.2e}, a tenth "
        f"of the adapter's own {adapter_kl:.2e}), max KL {metrics['kl_max']:.2e} over {n} positions"
    )


def verify(
    base: Path,
    merged: Path,
    targets: Mapping[str, LoraPair],
    *,
    compute_dtype: torch.dtype,
    nf4_weights: Mapping[str, torch.dtype] | None = None,
    texts: Sequence[str] = VERIFY_TEXTS,
    out_dtype: torch.dtype | None = None,
    text_only: bool = False,
) -> dict[str, Any]:
    """The weights by WEIGHT_RULE, then (when they pass) merged vs unmerged logits; returns the
    verdict and the numbers for merge_report.json."""
    started = time.perf_counter()
    weights = check_weights(
        base, merged, targets, out_dtype=out_dtype, text_only=text_only, nf4_names=sorted(nf4_weights or {})
    )
    if not weights["ok"]:
        return {
            "ok": False,
            "summary": weights["summary"],
            "weights": weights,
            "seconds": round(time.perf_counter() - started, 3),
        }
    result = _verify_logits(base, merged, targets, compute_dtype, nf4_weights, texts)
    result["ok"] = result["ok"] and weights["ok"]
    result["summary"] = f"{weights['summary']}; logits: {result['summary']}"
    result["weights"] = weights
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _verify_logits(
    base: Path,
    merged: Path,
    targets: Mapping[str, LoraPair],
    compute_dtype: torch.dtype,
    nf4_weights: Mapping[str, torch.dtype] | None,
    texts: Sequence[str],
) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    # Loading progress bars and warnings would bury the one-line verdict; put them back after.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _verify(base, merged, targets, compute_dtype, nf4_weights or {}, texts)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _verify(
    base: Path,
    merged: Path,
    targets: Mapping[str, LoraPair],
    compute_dtype: torch.dtype,
    nf4_weights: Mapping[str, torch.dtype],
    texts: Sequence[str],
) -> dict[str, Any]:
    started = time.perf_counter()
    prompts = prompt_ids(base, texts)

    model = load_model(merged, compute_dtype)
    merged_logits = logits(model, prompts)
    del model
    gc.collect()

    model = load_model(base, compute_dtype)
    base_logits = logits(model, prompts)
    attach_lora(model, targets)
    reference = logits(model, prompts)
    adapter_effect = compare(base_logits, reference)
    drift = None
    if nf4_weights:
        # The reference so far is the plain merge; now the base a QLoRA adapter was trained on.
        plain = reference
        with torch.no_grad():
            for name, stored in nf4_weights.items():
                parameter = model.get_parameter(name)
                parameter.copy_(nf4_roundtrip(parameter, stored).to(parameter.dtype))
        reference = logits(model, prompts)
        drift = compare(merged_logits, plain)
    del model
    gc.collect()

    metrics = compare(merged_logits, reference)
    ok, summary = judge(metrics, adapter_effect["kl_mean"], compute_dtype)
    result: dict[str, Any] = {
        "ok": ok,
        "summary": summary,
        "reference": "base + LoRA as forward hooks (unmerged)"
        + (", NF4 round-tripped base" if nf4_weights else ""),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "criteria": (
            {"atol": FP32_ATOL, "rtol": FP32_RTOL}
            if compute_dtype == torch.float32
            else {
                "min_top1_agreement": MIN_TOP1_AGREEMENT,
                "max_kl_mean": max(MAX_KL_SHARE_OF_ADAPTER * adapter_effect["kl_mean"], MIN_KL_BOUND),
            }
        ),
        **metrics,
        # How far the adapter moves the base: what makes the agreement above mean something.
        "adapter_effect": {k: adapter_effect[k] for k in ("max_abs_logit_diff", "top1_agreement", "kl_mean")},
    }
    if drift is not None:
        result["nf4_drift_from_plain_merge"] = drift
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result

"""--verify's second check, run once the weights pass: the logits, end to end (what the
checkpoint's config and layout make of those weights). The reference is the base model with each LoRA pair attached as a forward hook on the linear layer
it targets, computing what PEFT's unmerged LoRA layer computes: ``out + scale * B(A(x))`` in fp32,
added to the layer's output and rounded back to its dtype. Both models run, one after the other
(only one is in memory at a time), on the model card's prompt around a few endpoint texts.

* every logit of both models must be finite (NaN agrees with nothing, and fails every bound).
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
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.errors import MergeError, first_line
from merge.layout import architecture_class
from merge.lora import LoraPair
from merge.nf4 import nf4_roundtrip
from merge.safetensors_io import read_json

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


def load_model(path: Path, dtype: torch.dtype, what: str) -> torch.nn.Module:
    config = read_json(path / "config.json", f"verification: {what}'s config")
    architecture, model_class = architecture_class(config.get("architectures"))
    if model_class is None:
        raise MergeError(
            f"verification: architecture {architecture!r} of the {what} is unknown to transformers"
        )
    try:
        model: torch.nn.Module = model_class.from_pretrained(path, dtype=dtype).eval()
    except Exception as exc:  # noqa: BLE001 - whatever transformers objects to, the verdict is one line
        raise MergeError(f"verification: transformers cannot load the {what} ({first_line(exc)})") from None
    return model


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

        def add_lora(
            _: torch.nn.Module,
            args: tuple[Any, ...],
            out: torch.Tensor,
            a: torch.Tensor = a,
            b: torch.Tensor = b,
            scale: float = scale,
        ) -> torch.Tensor:
            lora = torch.nn.functional.linear(torch.nn.functional.linear(args[0].float(), a), b) * scale
            return (out + lora).to(out.dtype)

        handles.append(module.register_forward_hook(add_lora))
    return handles


@torch.no_grad()
def logits(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in prompts]


def compare(merged: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Per-position agreement of two models' logits over the same prompts. Every maximum is
    torch's, which keeps a NaN (Python's max() drops one unless it comes first)."""
    diffs = [(m - r).abs() for m, r in zip(merged, reference, strict=True)]
    max_abs = float(torch.stack([d.max() for d in diffs]).max())
    excess = [(d - FP32_RTOL * r.abs()).max() for d, r in zip(diffs, reference, strict=True)]
    worst_excess = float(torch.stack(excess).max())
    finite = all(bool(torch.isfinite(t).all()) for t in (*merged, *reference))
    kls, agree = [], 0
    for m, r in zip(merged, reference, strict=True):
        log_r, log_m = torch.log_softmax(r.double(), -1), torch.log_softmax(m.double(), -1)
        # clamp_min would turn a NaN into 0: only a negative rounding residue is clamped.
        kl = (log_r.exp() * (log_r - log_m)).sum(-1)
        kls.append(torch.where(kl < 0, torch.zeros_like(kl), kl))
        agree += int((m.argmax(-1) == r.argmax(-1)).sum())
    kl = torch.cat(kls)
    return {
        "positions": int(kl.numel()),
        "finite": finite,
        "max_abs_logit_diff": max_abs,
        "within_fp32_tolerance": finite and worst_excess <= FP32_ATOL,
        "top1_agreement": agree / kl.numel(),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def judge(metrics: Mapping[str, Any], adapter_kl: float, compute_dtype: torch.dtype) -> tuple[bool, str]:
    n = metrics["positions"]
    finite = bool(metrics["finite"]) and math.isfinite(adapter_kl)
    if compute_dtype == torch.float32:
        ok = finite and bool(metrics["within_fp32_tolerance"])
        verdict = "within" if ok else "NOT within"
        return ok, (
            f"fp32 logits {verdict} atol=rtol={FP32_ATOL:g} of the unmerged adapter's "
            f"(max |diff| {metrics['max_abs_logit_diff']:.2e} over {n} positions)"
            + ("" if finite else "; some logits are NaN or infinite")
        )
    kl_bound = max(MAX_KL_SHARE_OF_ADAPTER * adapter_kl, MIN_KL_BOUND) if finite else math.nan
    ok = finite and metrics["top1_agreement"] >= MIN_TOP1_AGREEMENT and metrics["kl_mean"] <= kl_bound
    return ok, (
        f"{str(compute_dtype).removeprefix('torch.')}: top-1 agreement {metrics['top1_agreement']:.1%} "
        f"(>= {MIN_TOP1_AGREEMENT:.0%}), mean KL {metrics['kl_mean']:.2e} (<= {kl_bound:.2e}, a tenth "
        f"of the adapter's own {adapter_kl:.2e}), max KL {metrics['kl_max']:.2e} over {n} positions"
        + ("" if finite else "; some logits are NaN or infinite")
    )


def verify_logits(
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
    # transformers' logging functions carry no annotations; strict mypy flags each call.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return _verify(base, merged, targets, compute_dtype, nf4_weights or {}, texts)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


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

    model = load_model(merged, compute_dtype, "merged checkpoint")
    merged_logits = logits(model, prompts)
    del model
    gc.collect()

    model = load_model(base, compute_dtype, f"base {base}")
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

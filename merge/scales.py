"""Each LoRA module's scale as --verify expects it, derived apart from the merge's load_adapter().

A check that took the scale from the function that merged with it would repeat that function's
mistakes (alpha // r, a rank_pattern read only with rsLoRA) and call the result verified. So the
expected scale comes from PEFT itself where PEFT is installed: its LoraConfig reads
adapter_config.json, its get_pattern_key picks each module's r and alpha, and its own LoRA layer
computes the scale. Without PEFT it comes from a second reading of adapter_config.json written
here, separately from merge/lora.py (the tests hold both readings to PEFT)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from merge.errors import MergeError, first_line
from merge.safetensors_io import read_json

# Where adapter_config.json leaves them out, PEFT's LoraConfig defaults.
DEFAULT_R = 8
DEFAULT_ALPHA = 8


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def expected_scales(adapter: Path, modules: Iterable[str]) -> tuple[dict[str, float], str]:
    """module -> scale, and where the scales came from ("peft" or "adapter_config.json")."""
    if peft_available():
        return peft_scales(adapter, modules), "peft"
    return config_scales(read_json(adapter / "adapter_config.json", "adapter config"), modules), (
        "adapter_config.json"
    )


def peft_scales(adapter: Path, modules: Iterable[str]) -> dict[str, float]:
    """The scale PEFT's LoRA layer gives each module when it loads this adapter."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    from peft.utils.other import get_pattern_key

    try:
        with warnings.catch_warnings():  # keys newer than this PEFT: warned of, and no part of the scale
            warnings.simplefilter("ignore")
            config = LoraConfig.from_pretrained(str(adapter))
        # The layer below only exists to compute the scale: a plain init keeps it from needing
        # data (EVA) or an even rank (orthogonal) that have nothing to do with the scale.
        config.init_lora_weights = True
        scales = {}
        rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
        for module in modules:
            r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.r)
            alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.lora_alpha)
            layer = Linear(torch.nn.Linear(1, 1, bias=False), "default", config, r=r, lora_alpha=alpha)
            scales[module] = float(layer.scaling["default"])
    except Exception as exc:  # noqa: BLE001 - whatever PEFT objects to, the verdict is the same
        raise MergeError(f"verification: PEFT cannot read the adapter's scales ({first_line(exc)})") from None
    return scales


def _first_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The pattern key that decides ``module``: the first, in the config's order, that matches
    the whole of the module's name or the whole of a dotted tail of it (keys are regexes)."""
    for key in patterns:
        if re.fullmatch(f"(?:.*\\.)?(?:{key})", module) is not None:
            return key
    return None


def _number(value: Any, what: str, module: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MergeError(f"verification: adapter module {module!r} has {what}={value!r}, not a number")
    return float(value)


def config_scales(config: Mapping[str, Any], modules: Iterable[str]) -> dict[str, float]:
    """The scale of each module by adapter_config.json alone: alpha / r, or alpha / sqrt(r) with
    use_rslora, r and alpha each taken from rank_pattern / alpha_pattern where a key matches."""
    rank_pattern: Mapping[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: Mapping[str, Any] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    scales = {}
    for module in modules:
        r_key, alpha_key = _first_key(rank_pattern, module), _first_key(alpha_pattern, module)
        rank = _number(config.get("r", DEFAULT_R) if r_key is None else rank_pattern[r_key], "r", module)
        alpha = _number(
            config.get("lora_alpha", DEFAULT_ALPHA) if alpha_key is None else alpha_pattern[alpha_key],
            "lora_alpha",
            module,
        )
        if rank <= 0:
            raise MergeError(f"verification: adapter module {module!r} has r={rank:g}, not a positive rank")
        scales[module] = alpha / (math.sqrt(rank) if rslora else rank)
    return scales

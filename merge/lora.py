"""The adapter: adapter_config.json read and checked, its LoRA pairs, and W + scale * B @ A.

scale = alpha / r, or alpha / sqrt(r) with rsLoRA, per module with alpha_pattern / rank_pattern.
--verify does not take the scale from here: merge/scales.py derives it apart (PEFT's own, or a
second reading of the config), so a mistake here is not repeated there."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge.errors import MergeError
from merge.safetensors_io import CASTABLE, Entry, read_header, read_json

ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
# LoRA variants and options whose effect is not W + scale * B @ A on the targeted weights.
UNMERGEABLE_OPTIONS = {
    "use_dora": "DoRA (use_dora=true): its magnitude vector cannot be merged as W + BA",
    "lora_bias": "lora_bias=true: the adapter trains a bias for lora_B",
    "layer_replication": "layer_replication: the adapter changes the number of layers",
    "target_parameters": "target_parameters: LoRA on raw parameters (MoE experts) is not handled",
    "trainable_token_indices": "trainable_token_indices: the adapter retrains embedding rows",
    "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens): applies only after its "
    "invocation tokens, which no merge can reproduce",
    "use_qalora": "QALoRA (use_qalora=true): its pooled input is not W + BA",
    "monteclora_config": "MonteCLoRA: a sampled adapter, not one W + BA",
    "kasa_config": "KaSA (kasa_config): it truncated the base weights' singular values before training "
    "and scales B @ A by a learnt diagonal",
    "use_bdlora": "BD-LoRA (use_bdlora): its block-diagonal A or B is stored in blocks, not as W + BA's factors",
    "arrow_config": "Arrow (arrow_config): it routes each token among several LoRA experts",
}
# LoraConfig's options that are true or false (null taken as PEFT takes it: false).
BOOLEAN_OPTIONS = ("use_rslora", "use_dora", "lora_bias", "use_qalora", "fan_in_fan_out")
# PEFT's init_lora_weights values that leave the base weights as they are (B = 0 or A = 0 at the
# start, or a random B A that training starts from): the saved adapter is a plain W + scale * B @ A.
PLAIN_INITS = {"true", "false", "gaussian", "eva", "orthogonal", "mica"}
# Inits that subtract their starting B @ A from the base (or quantize it) before training: the
# adapter only fits that modified base, which --base is not, unless PEFT converted it when saving.
CONVERT = (
    "re-save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=<the "
    "adapter as initialised>), which turns it into a plain LoRA of rank 2r, and merge that"
)
BASE_CHANGING_INITS = {
    "pissa": CONVERT,
    "olora": CONVERT,
    "corda": CONVERT,
    "lora_ga": CONVERT,
    "loftq": "LoftQ trains against its own quantized base, saved at initialisation; merge with PEFT "
    "against that model instead",
}


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key, in order, that matches the end
    # of the module name at a dot boundary (keys may be regexes).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _names_module(spec: str | Sequence[str], module: str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a regex that must match the
    whole module name; a list names modules by their full name or a dotted suffix of it."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith(f".{name}") for name in spec)


def _targeted(config: Mapping[str, Any], module: str) -> bool:
    """Whether PEFT would have put a LoRA on ``module`` (peft.tuners.tuners_utils.
    check_target_module_exists): excluded modules never, then target_modules, then for a list of
    targets layers_to_transform / layers_pattern on the module's layer index."""
    excluded = config.get("exclude_modules")
    if excluded and _names_module(excluded, module):
        return False
    targets = config.get("target_modules")
    # Every linear (the adapter holds only those); PEFT lowercases the keyword.
    if not targets or isinstance(targets, str) and targets.lower() == "all-linear":
        return True
    if isinstance(targets, str):
        return _names_module(targets, module)
    if module in targets:
        return True
    if not _names_module(targets, module):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        # The first numbered segment (the layer index), as PEFT's lazy match finds it.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for name in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _regex(key: object, where: str) -> None:
    if not isinstance(key, str):
        raise MergeError(f"adapter {where} holds {key!r}, not a module name or pattern")
    try:
        re.compile(key)
    except re.error as exc:
        raise MergeError(f"adapter {where} holds {key!r}, not a valid regular expression ({exc})") from None


def _as_list(value: object) -> list[Any]:
    """An option that PEFT takes as one value or a list of them, as a list (None: empty)."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _check_types(config: Mapping[str, Any]) -> None:
    """The options that choose modules and scales hold what PEFT's LoraConfig takes: a wrong type
    is a one-line refusal here, not a traceback (or a silently different meaning) later."""
    for option in ("target_modules", "exclude_modules"):
        spec = config.get(option)
        if spec is None or isinstance(spec, str):
            if spec is not None and spec.lower() != "all-linear":
                _regex(spec, option)
        elif isinstance(spec, list):
            for name in spec:
                if not isinstance(name, str):
                    raise MergeError(f"adapter {option} holds {name!r}, not a module name")
        else:
            raise MergeError(f"adapter {option}={spec!r} is neither a pattern nor a list of module names")
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(option)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise MergeError(f"adapter {option}={patterns!r} is not an object of pattern -> value")
        for key in patterns:
            _regex(key, option)
    layers = config.get("layers_to_transform")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in _as_list(layers)):
        raise MergeError(
            f"adapter layers_to_transform={layers!r} is neither a layer index nor a list of them"
        )
    for name in _as_list(config.get("layers_pattern")):
        _regex(name, "layers_pattern")
    # A string "false" is truthy: taken as it stands it would turn an option on. PEFT saves what
    # it was given, so 0 and 1 are read as it reads them.
    for option in BOOLEAN_OPTIONS:
        if config.get(option) not in (None, True, False):
            raise MergeError(f"adapter {option}={config[option]!r} is not true or false")


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse, in one line, the adapter options whose effect is not W + scale * B @ A."""
    _check_types(config)
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"adapter peft_type {config.get('peft_type')!r} is not LORA")
    for option, why in UNMERGEABLE_OPTIONS.items():
        if config.get(option):
            raise MergeError(f"adapter uses {why}")
    check_init(config.get("init_lora_weights", True))
    if config.get("fan_in_fan_out"):
        raise MergeError("adapter has fan_in_fan_out=true (Conv1D layout), which Gemma 4 never uses")
    if config.get("bias", "none") != "none":
        raise MergeError(f"adapter trains biases (bias={config['bias']!r}); only bias='none' is merged")
    if config.get("modules_to_save"):
        raise MergeError(f"adapter has modules_to_save={config['modules_to_save']}; not supported")


def check_init(init: Any) -> None:
    """Refuse adapters whose init_lora_weights changed the base weights (PiSSA, OLoRA, CorDA,
    LoRA-GA, LoftQ) and were saved without PEFT's conversion back to a plain LoRA; PEFT's
    conversion writes init_lora_weights=true. Unknown values are refused too: new inits may be
    base-changing ones."""
    name = str(init).lower()
    if name in PLAIN_INITS:
        return
    kind = "pissa" if name.startswith("pissa") else name
    how = BASE_CHANGING_INITS.get(kind)
    if how is None:
        raise MergeError(
            f"adapter init_lora_weights={init!r} is unknown to this merge, which only knows inits "
            f"that leave the base as it is ({', '.join(sorted(PLAIN_INITS))})"
        )
    raise MergeError(
        f"adapter init_lora_weights={init!r} changed the base weights before training, so it does "
        f"not fit --base as saved: {how}"
    )


def _read_halves(weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {"A": lora_A, "B": lora_B}, every value finite."""
    from safetensors import safe_open

    # A corrupt file is a one-line error here, not safetensors' exception.
    dtypes = {entry.name: entry.dtype for entry in read_header(weights)[1]}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            match = ADAPTER_KEY.match(key)
            if match is None:
                raise MergeError(f"adapter tensor {key!r} is not a LoRA A/B weight; cannot merge it")
            half = halves.setdefault(match["module"], {})
            if match["ab"] in half:  # two adapters in one file (lora_A.x and lora_A.y): which one?
                raise MergeError(
                    f"adapter holds lora_{match['ab']} of {match['module']!r} twice (last: {key!r})"
                )
            if dtypes[key] not in CASTABLE:  # integers or fp8 are no trained LoRA factors
                raise MergeError(
                    f"adapter tensor {key!r} is {dtypes[key]}; LoRA weights are F16, BF16, F32 or F64"
                )
            tensor = f.get_tensor(key)
            # NaN or inf would be merged into the weights and compare equal to nothing, the
            # reference included: the adapter is broken, and saying so here names the culprit.
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise MergeError(
                    f"adapter tensor {key!r} holds {bad} NaN or infinite values; cannot merge it"
                )
            half[match["ab"]] = tensor
    return halves


def load_adapter(adapter: Path) -> tuple[dict[str, Any], dict[str, LoraPair]]:
    config_path = adapter / "adapter_config.json"
    if not config_path.exists():
        raise MergeError(f"adapter {adapter} has no adapter_config.json")
    config = read_json(config_path, "adapter config")
    check_config(config)
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise MergeError(f"adapter {adapter} has no adapter_model.safetensors")
    halves = _read_halves(weights)

    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    targets = config.get("target_modules")
    pairs: dict[str, LoraPair] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"adapter module {module!r} has lora_{''.join(ab)} but not its twin")
        if not _targeted(config, module):
            raise MergeError(
                f"adapter module {module!r} is not one PEFT would target with target_modules={targets} "
                f"(exclude_modules, layers_to_transform and layers_pattern applied)"
            )
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise MergeError(
                f"adapter module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain"
            )
        mod_rank = _pattern_value(config.get("rank_pattern") or {}, module, rank)
        mod_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        for what, value in (("r", mod_rank), ("lora_alpha", mod_alpha)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not _finite_number(value):
                raise MergeError(f"adapter module {module!r}: {what}={_short(value)} is not a number")
        if mod_rank <= 0:
            raise MergeError(f"adapter module {module!r}: r={mod_rank!r} is not a positive rank")
        if a.shape[0] != mod_rank:
            raise MergeError(
                f"adapter module {module!r} has rank {a.shape[0]} but its config says r={mod_rank} "
                "(r / rank_pattern): the scale would be wrong"
            )
        scale = mod_alpha / math.sqrt(mod_rank) if rslora else mod_alpha / mod_rank
        pairs[module] = LoraPair(module, a, b, float(scale))
    if not pairs:
        raise MergeError(f"adapter {adapter} holds no LoRA tensors")
    return config, pairs


def _finite_number(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float (JSON allows 400 digits)
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def plan_targets(pairs: dict[str, LoraPair], index: Mapping[str, Entry]) -> dict[str, LoraPair]:
    """Base tensor name -> the LoRA pair merged into it. Refuses what does not fit."""
    targets: dict[str, LoraPair] = {}
    for module, pair in pairs.items():
        # Language-model linears hold `.weight`; the towers' Gemma4ClippableLinear holds
        # `.linear.weight`, which the model card's monkey-patch renamed away in the adapter.
        for key in (f"{module}.weight", f"{module}.linear.weight"):
            if key in index:
                break
        else:
            raise MergeError(
                f"adapter module {module!r} has no weight in the base (neither .weight nor "
                ".linear.weight): adapter trained on another base?"
            )
        expected = (pair.b.shape[0], pair.a.shape[1])
        if index[key].shape != expected:
            raise MergeError(
                f"shape mismatch for {key}: base {index[key].shape}, adapter B@A {expected}: "
                "adapter trained on another base?"
            )
        if index[key].dtype not in CASTABLE:
            raise MergeError(
                f"base weight {key} is {index[key].dtype}: a quantized base cannot be merged into"
            )
        targets[key] = pair
    return targets


def merged_tensor(weight: torch.Tensor, pair: LoraPair, dtype: torch.dtype) -> torch.Tensor:
    """W + scale * B @ A in fp32, rounded once to ``dtype``. ``weight`` may be a block of rows,
    with ``pair.b`` the same rows of B. The delta is formed first and W added to it last, so that
    W takes one rounding: merge/verify.py's WEIGHT_RULE proves its bound for exactly this order (a
    fused addmm may add W into a partial sum more than once)."""
    # fp32, as WEIGHT_RULE bounds it; an fp64 base (or output) keeps its own precision.
    compute = torch.float64 if torch.float64 in (weight.dtype, dtype) else torch.float32
    delta = torch.mm(pair.b.to(compute), pair.a.to(compute)).mul_(pair.scale)
    return delta.add_(weight).to(dtype).contiguous()

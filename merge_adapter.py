"""Merge a PEFT LoRA adapter into Gemma 4 base weights, tensor by tensor, straight from safetensors.

    python merge_adapter.py --base google/gemma-4-E4B-it \
        --adapter Shubh-0789/gemma4-clinical-endpoint-extractor --output merged/ [--text-only] [--verify]

W' = W + scale * B @ A in fp32 (scale = alpha / r, or alpha / sqrt(r) with rsLoRA, per module
with alpha_pattern / rank_pattern); every other tensor is copied unchanged. Each output shard is
streamed to disk tensor by tensor, so memory holds one tensor (and the adapter), not the model.
Tower LoRA tensors saved under the model card's monkey-patched names (``...q_proj.lora_A``) are
mapped onto the real weights (``...q_proj.linear.weight``), or skipped with ``--text-only``,
which writes a ``Gemma4ForCausalLM`` checkpoint of the language model alone (what vLLM's CPU build
can serve). ``--base-weights nf4`` first round-trips the language model's linear weights through
NF4 (what a QLoRA adapter was trained against). ``--verify`` compares the merged model's logits
with the base's plus the adapter applied unmerged. The output is written to a temporary directory
next to ``--output`` and renamed into place only when complete (and verified).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LM_PREFIX = "model.language_model."
# Files copied from the base as they are. Processor files only matter for the multimodal layout.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
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

# safetensors dtype -> (bytes per element, torch dtype)
ST_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32),
    "I16": (2, torch.int16), "I8": (1, torch.int8), "U8": (1, torch.uint8), "BOOL": (1, torch.bool),
    "U16": (2, torch.uint16), "U32": (4, torch.uint32), "U64": (8, torch.uint64),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
}  # fmt: skip
ST_NAME = {torch_dtype: name for name, (_, torch_dtype) in ST_DTYPES.items()}
CASTABLE = {"F64", "F32", "F16", "BF16"}  # what --dtype converts; integers and fp8 stay as they are
CHUNK_BYTES = 16 << 20  # copies and casts stream through this much memory at a time
CHUNK_VALUES = 1 << 22  # merges and NF4 round trips work on this many fp32 values at a time


class MergeError(Exception):
    """A merge that cannot be done faithfully. The message is one line and names the culprit."""


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, located by absolute byte offset."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


@dataclass
class Report:
    base: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    layout: str = "full"
    dtype: str = "auto"
    base_weights: str = "as-is"
    scale: float = 0.0
    use_rslora: bool = False
    scale_overrides: dict[str, float] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    merged_tower: list[str] = field(default_factory=list)
    skipped_tower: list[str] = field(default_factory=list)
    skipped_tower_max_abs_b: float = 0.0
    copied_tensors: int = 0
    cast_tensors: int = 0
    dropped_tensors: int = 0
    nf4: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    verification: dict[str, Any] | None = None

    def write(self, directory: Path) -> None:
        (directory / "merge_report.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Inputs


def resolve(name_or_path: str, what: str, patterns: Sequence[str] | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face Hub id, downloaded (only) when reachable."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise MergeError(f"{what} {name_or_path!r} is a file; expected a directory or a hub id")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise MergeError(f"{what} {name_or_path!r}: no such directory (and not a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=list(patterns) if patterns else None))
    except Exception as exc:  # noqa: BLE001 - any hub failure ends in the same one-line message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeError(
            f"{what} {name_or_path!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({reason}); download it where a network exists and pass the directory"
        ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_header(path: Path) -> tuple[dict[str, str], list[Entry]]:
    """A safetensors file's metadata and tensors (in file order), from its header alone."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if length > min(size - 8, 100_000_000):
            raise MergeError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise MergeError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        try:
            dtype, (begin, end), shape = (
                info["dtype"],
                info["data_offsets"],
                tuple(int(d) for d in info["shape"]),
            )
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path} is not a safetensors file (bad entry for {name!r})") from None
        if dtype not in ST_DTYPES:
            raise MergeError(f"{path.name}: tensor {name!r} has dtype {dtype}, unknown to this merge")
        if end - begin != math.prod(shape) * ST_DTYPES[dtype][0] or 8 + length + end > size:
            raise MergeError(f"{path.name}: tensor {name!r} is truncated or corrupt")
        entries.append(Entry(path, name, dtype, shape, 8 + length + begin, end - begin))
    return metadata, sorted(entries, key=lambda e: e.start)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line MergeError saying what is wrong with it."""
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{what} {path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MergeError(f"{what} {path} is not a JSON object")
    return document


def weight_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "base index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MergeError(f"base index {index} has no weight_map of tensor -> file names")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (base / n).exists()]
        if missing:
            raise MergeError(f"base {base} index names {missing[0]}, which is missing")
        return [base / n for n in names]
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise MergeError(f"base {base} holds no *.safetensors weights")
    return files


def base_index(files: Sequence[Path]) -> dict[str, Entry]:
    """Every base tensor name -> where it lies, read from headers only."""
    index: dict[str, Entry] = {}
    for file in files:
        for entry in read_header(file)[1]:
            if entry.name in index:
                raise MergeError(
                    f"base tensor {entry.name!r} is in both {index[entry.name].file.name} and {file.name}"
                )
            index[entry.name] = entry
    return index


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
    if not targets or targets == "all-linear":  # every linear (the adapter holds only those)
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


def load_adapter(adapter: Path) -> tuple[dict[str, Any], dict[str, LoraPair]]:
    from safetensors import safe_open

    config_path = adapter / "adapter_config.json"
    if not config_path.exists():
        raise MergeError(f"adapter {adapter} has no adapter_config.json")
    config = read_json(config_path, "adapter config")
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
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise MergeError(f"adapter {adapter} has no adapter_model.safetensors")

    read_header(weights)  # a corrupt file is a one-line error here, not safetensors' exception
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
            half[match["ab"]] = f.get_tensor(key)

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
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise MergeError(f"adapter module {module!r}: {what}={value!r} is not a number")
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


# ---------------------------------------------------------------------------------------------
# NF4, as bitsandbytes stores QLoRA bases (quantize_4bit with quant_type="nf4", blocksize 64,
# compress_statistics=True): per 64 weights one absmax; the absmaxes, less their mean, are
# themselves quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map.

NF4_BLOCKSIZE = 64
NF4_STATS_BLOCKSIZE = 256
# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): normal quantiles, normalised to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (functional.create_dynamic_map), used for the absmaxes."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``flat`` (the last one zero-padded) scaled into [-1, 1], and each block's absmax.
    Scaled by the reciprocal of the absmax, as bitsandbytes' kernels do."""
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return (blocks * inverse[:, None]).clamp(-1.0, 1.0), absmax


def nf4_quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of every value (blocks of 64) and the blocks' absmaxes. bitsandbytes' dQuantizeNF4
    compares with the midpoints between codes, and a value on a midpoint takes the lower code:
    bucketize's rule."""
    scaled, absmax = _blockwise_scale(flat, NF4_BLOCKSIZE)
    return torch.bucketize(scaled, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2), absmax


def dynamic_quantize(
    flat: torch.Tensor, blocksize: int = NF4_STATS_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic codes of every value and the blocks' absmaxes, chosen by bitsandbytes' CUDA
    binary search (dQuantize<0>, vectorised here): the nearest code, except that a value on a
    midpoint goes wherever the search path ends."""
    x, absmax = _blockwise_scale(flat, blocksize)
    code = DYNAMIC_CODE
    pivot = torch.full(x.shape, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > value
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, value, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, value)
        pivot = pivot + torch.where(right, step, -step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(x > (upper + value) * 0.5, upper_pivot, pivot)
    below = torch.where(x < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(x > value, above, below), absmax


def nf4_roundtrip(
    weight: torch.Tensor, dtype: torch.dtype | None = None, *, double_quant: bool = True
) -> torch.Tensor:
    """``weight`` quantized to NF4 and dequantized again, as bitsandbytes would hand it to a matmul.
    Works through CHUNK_VALUES values at a time: beside the result it holds one byte per value."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmaxes = []
    for start in range(0, n, CHUNK_VALUES):
        index, absmax = nf4_quantize(flat[start : start + CHUNK_VALUES].to(torch.float32))
        codes[start : start + CHUNK_VALUES] = index.reshape(-1)[: min(CHUNK_VALUES, n - start)].to(
            torch.uint8
        )
        absmaxes.append(absmax)
    absmax = torch.cat(absmaxes) if absmaxes else torch.zeros(0)
    if double_quant and absmax.numel():
        offset = absmax.mean()
        q_stats, stats_absmax = dynamic_quantize(absmax - offset)
        absmax = (DYNAMIC_CODE[q_stats] * stats_absmax[:, None]).reshape(-1)[: absmax.numel()] + offset
    out = torch.empty(n, dtype=dtype or weight.dtype)
    blocks_per_chunk = CHUNK_VALUES // NF4_BLOCKSIZE
    for chunk, start in enumerate(range(0, n, CHUNK_VALUES)):
        index = codes[start : start + CHUNK_VALUES].long()
        scale = absmax[chunk * blocks_per_chunk : (chunk + 1) * blocks_per_chunk]
        index = torch.nn.functional.pad(index, (0, -index.numel() % NF4_BLOCKSIZE)).view(-1, NF4_BLOCKSIZE)
        # As bitsandbytes' dequantize kernel: the fp32 product, rounded once to the weight's dtype.
        values = (NF4_CODE[index] * scale[:, None]).reshape(-1)[: min(CHUNK_VALUES, n - start)]
        out[start : start + CHUNK_VALUES] = values
    return out.reshape(weight.shape)


def lm_linear_weights(base: Path, index: Mapping[str, Entry]) -> list[str]:
    """The language model's nn.Linear weights: what a 4-bit (QLoRA) load quantizes. The embeddings
    and the tied output head stay in 16 bits there, and so here."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise MergeError(
            f"base architecture {architecture!r} is unknown to transformers; cannot find its linears"
        )
    with torch.device("meta"):
        model = model_class(config)
    names = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(LM_PREFIX)
    ]
    return sorted(n for n in names if n in index)


# ---------------------------------------------------------------------------------------------
# Merge


def merged_tensor(weight: torch.Tensor, pair: LoraPair, dtype: torch.dtype) -> torch.Tensor:
    """W + scale * B @ A in fp32, rounded once to ``dtype``. ``weight`` may be a block of rows,
    with ``pair.b`` the same rows of B. The delta is formed first and W added to it last, so that
    W takes one rounding: verify_merge's WEIGHT_RULE proves its bound for exactly this order (a
    fused addmm may add W into a partial sum more than once)."""
    delta = torch.mm(pair.b.to(torch.float32), pair.a.to(torch.float32)).mul_(pair.scale)
    return delta.add_(weight).to(dtype).contiguous()


def is_language_model(key: str) -> bool:
    return key.startswith(LM_PREFIX) or key == "lm_head.weight"


def output_name(key: str, text_only: bool) -> str | None:
    """Output tensor name, or None when the tensor is dropped (towers in a text-only export)."""
    if not text_only:
        return key
    if key.startswith(LM_PREFIX):
        return "model." + key[len(LM_PREFIX) :]
    if key == "lm_head.weight":
        return key
    return None


@dataclass(frozen=True)
class Planned:
    """One output tensor: where it comes from and what happens to it on the way."""

    name: str
    source: Entry
    dtype: str
    pair: LoraPair | None = None
    nf4: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.source.shape) * ST_DTYPES[self.dtype][0]


def _read_exactly(src: BinaryIO, start: int, nbytes: int) -> bytearray:
    buffer = bytearray(nbytes)
    view, done = memoryview(buffer), 0
    src.seek(start)
    while done < nbytes:
        got = src.readinto(view[done:])
        if not got:
            raise MergeError(f"{getattr(src, 'name', 'input')} ended early: truncated safetensors file")
        done += got
    return buffer


def _read_tensor(src: BinaryIO, entry: Entry) -> torch.Tensor:
    torch_dtype = ST_DTYPES[entry.dtype][1]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype)
    return torch.frombuffer(_read_exactly(src, entry.start, entry.nbytes), dtype=torch_dtype).reshape(
        entry.shape
    )


def _write_tensor(dst: BinaryIO, tensor: torch.Tensor) -> None:
    if tensor.numel():
        dst.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _stream(src: BinaryIO, dst: BinaryIO, item: Planned) -> None:
    """Copy (bit for bit) or cast one tensor through a bounded buffer."""
    itemsize, source_dtype = ST_DTYPES[item.source.dtype]
    step = max(CHUNK_BYTES // itemsize, 1) * itemsize
    for offset in range(0, item.source.nbytes, step):
        chunk = _read_exactly(src, item.source.start + offset, min(step, item.source.nbytes - offset))
        if item.dtype == item.source.dtype:
            dst.write(chunk)
        else:
            _write_tensor(dst, torch.frombuffer(chunk, dtype=source_dtype).to(ST_DTYPES[item.dtype][1]))


def write_shard(path: Path, items: Sequence[Planned], metadata: Mapping[str, str]) -> dict[str, float]:
    """Write one safetensors file, streaming each tensor from its source as it goes; return the
    relative error that the NF4 round trip made in each weight it touched.

    safetensors' save_file needs the whole shard in memory, and copies it once more to bytes; the
    header here is known up front (names, dtypes, shapes), so each tensor is read, changed and
    written alone. Tensors are ordered as save_file orders them (widest dtype first, then by name)
    so that every tensor stays aligned to its element size."""
    order = sorted(items, key=lambda p: (-ST_DTYPES[p.dtype][0], p.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    position = 0
    for item in order:
        header[item.name] = {
            "dtype": item.dtype,
            "shape": list(item.source.shape),
            "data_offsets": [position, position + item.nbytes],
        }
        position += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    sources: dict[Path, BinaryIO] = {}
    nf4_errors: dict[str, float] = {}
    try:
        with path.open("wb") as dst:
            dst.write(struct.pack("<Q", len(blob)) + blob)
            data_start = dst.tell()
            for item in order:
                src = sources.get(item.source.file)
                if src is None:
                    src = sources[item.source.file] = item.source.file.open("rb", buffering=0)
                expected = dst.tell() - data_start + item.nbytes
                if item.pair is None and not item.nf4:
                    _stream(src, dst, item)
                else:
                    weight = _read_tensor(src, item.source)
                    if item.nf4:
                        original, weight = weight, nf4_roundtrip(weight)
                        nf4_errors[item.source.name] = _relative_error(weight, original)
                        del original
                    _write_changed(dst, weight, item.pair, ST_DTYPES[item.dtype][1])
                    del weight
                if dst.tell() - data_start != expected:
                    raise MergeError(f"internal error: {item.name} wrote the wrong number of bytes")
    finally:
        for src in sources.values():
            src.close()
    return nf4_errors


def _write_changed(dst: BinaryIO, weight: torch.Tensor, pair: LoraPair | None, dtype: torch.dtype) -> None:
    """Write ``weight`` (merged with ``pair`` when given) as ``dtype``, a block of rows at a time, so
    that the fp32 copies stay small whatever the weight's size."""
    rows = max(1, CHUNK_VALUES // max(1, math.prod(weight.shape[1:])))
    if weight.ndim == 0 or pair is None and weight.dtype == dtype:
        _write_tensor(dst, weight.to(dtype))
        return
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        if pair is None:
            _write_tensor(dst, block.to(dtype))
        else:
            part = LoraPair(pair.module, pair.a, pair.b[start : start + rows], pair.scale)
            _write_tensor(dst, merged_tensor(block, part, dtype))


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact||, accumulated a chunk at a time."""
    error = norm = 0.0
    a, e = approx.reshape(-1), exact.reshape(-1)
    for start in range(0, e.numel(), CHUNK_VALUES):
        exact_part = e[start : start + CHUNK_VALUES].to(torch.float64)
        error += float((a[start : start + CHUNK_VALUES].to(torch.float64) - exact_part).square().sum())
        norm += float(exact_part.square().sum())
    return math.sqrt(error / norm) if norm > 0 else 0.0


def text_only_config(config: dict[str, Any], dtype_name: str | None) -> dict[str, Any]:
    text = dict(config.get("text_config") or {})
    if not text:
        raise MergeError("base config.json has no text_config; is it a Gemma 4 checkpoint?")
    text["architectures"] = ["Gemma4ForCausalLM"]
    text["model_type"] = "gemma4_text"
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    if dtype_name:
        text["dtype"] = dtype_name
    return text


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM where there is one. Linux carries the peak from
    before exec into ru_maxrss, so there it would include the parent that started this process."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def merge(
    base: Path,
    adapter: Path,
    output: Path,
    *,
    dtype_name: str = "auto",
    text_only: bool = False,
    overwrite: bool = False,
    base_weights: str = "as-is",
    verify: bool = False,
) -> Report:
    started = time.perf_counter()
    output = output.expanduser().resolve()
    # First, so that a previous output a killed run had moved aside is back before the check.
    clean_stale(output)
    check_output(output, overwrite, protected={"base": base, "adapter": adapter})
    if base_weights not in ("as-is", "nf4"):
        raise MergeError(f"--base-weights {base_weights!r}: expected 'as-is' or 'nf4'")
    config_path = base / "config.json"
    if not config_path.exists():
        raise MergeError(f"base {base} has no config.json")
    config = read_json(config_path, "base config")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise MergeError(f"base {base} is quantized ({method}); merge into the unquantized base")
    files = weight_files(base)
    index = base_index(files)
    adapter_config, pairs = load_adapter(adapter)
    all_targets = plan_targets(pairs, index)
    targets = dict(all_targets)
    dtype = DTYPES[dtype_name] if dtype_name != "auto" else None
    nf4_names = set(lm_linear_weights(base, index)) if base_weights == "nf4" else set()

    rslora = bool(adapter_config.get("use_rslora", False))
    rank, alpha = adapter_config.get("r", 8), adapter_config.get("lora_alpha", 8)
    default_scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    report = Report(
        output=str(output),
        layout="text-only" if text_only else "full",
        dtype=dtype_name,
        base_weights=base_weights,
        use_rslora=rslora,
        scale=float(default_scale),
        scale_overrides={
            p.module: p.scale for p in pairs.values() if not math.isclose(p.scale, default_scale)
        },
    )
    report.base = {"path": str(base), "files": {f.name: sha256(f) for f in files}}
    report.adapter = {
        "path": str(adapter),
        "files": {n: sha256(adapter / n) for n in ("adapter_config.json", "adapter_model.safetensors")},
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": adapter_config.get("target_modules"),
        "rank_pattern": adapter_config.get("rank_pattern") or {},
        "alpha_pattern": adapter_config.get("alpha_pattern") or {},
    }
    if text_only:
        for key in [k for k in targets if not is_language_model(k)]:
            pair = targets.pop(key)
            report.skipped_tower.append(key)
            report.skipped_tower_max_abs_b = max(report.skipped_tower_max_abs_b, float(pair.b.abs().max()))
    report.seconds["plan"] = round(time.perf_counter() - started, 3)

    created = make_parents(output.parent)
    try:
        staging, lock = make_staging(output)
    except BaseException:
        remove_created(created)
        raise
    try:
        weight_map: dict[str, str] = {}
        nf4_errors: dict[str, float] = {}
        total_bytes, total_params = 0, 0
        for file in files:
            metadata, entries = read_header(file)
            items: list[Planned] = []
            for entry in entries:
                name = output_name(entry.name, text_only)
                if name is None:
                    report.dropped_tensors += 1
                    continue
                out_dtype = ST_NAME[dtype] if dtype is not None and entry.dtype in CASTABLE else entry.dtype
                item = Planned(name, entry, out_dtype, targets.get(entry.name), entry.name in nf4_names)
                items.append(item)
                if item.pair is not None:
                    (report.merged if is_language_model(entry.name) else report.merged_tower).append(
                        entry.name
                    )
                elif not item.nf4:
                    report.copied_tensors += out_dtype == entry.dtype
                    report.cast_tensors += out_dtype != entry.dtype
                total_bytes += item.nbytes
                total_params += math.prod(entry.shape)
            if items:
                nf4_errors.update(write_shard(staging / file.name, items, metadata))
                weight_map.update({item.name: file.name for item in items})
        if (base / "model.safetensors.index.json").exists():
            base_meta = read_json(base / "model.safetensors.index.json", "base index").get("metadata") or {}
            if not isinstance(base_meta, dict):
                base_meta = {}
            index_meta = {**base_meta, "total_size": total_bytes}
            if "total_parameters" in base_meta:
                index_meta["total_parameters"] = total_params
            index_doc = {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        if nf4_names:
            errors = list(nf4_errors.values())
            report.nf4 = {
                "tensors": len(errors),
                "blocksize": NF4_BLOCKSIZE,
                "double_quant": True,
                "weight_relative_error_mean": round(sum(errors) / max(len(errors), 1), 6),
                "weight_relative_error_max": round(max(errors, default=0.0), 6),
            }
        report.seconds["merge"] = round(time.perf_counter() - started - report.seconds["plan"], 3)

        out_dtype_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype_name)
        out_config = text_only_config(config, out_dtype_name) if text_only else dict(config)
        if not text_only and out_dtype_name:
            out_config["dtype"] = out_dtype_name
        (staging / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for name in TOKENIZER_FILES + (() if text_only else PROCESSOR_FILES):
            if (base / name).exists():
                shutil.copy2(base / name, staging / name)
        report.peak_rss_mib = peak_rss_mib()

        if verify:
            from verify_merge import verify as verify_merge  # noqa: PLC0415 - heavy, only with --verify

            target_dtype = ST_DTYPES[index[next(iter(all_targets))].dtype][1]
            report.verification = verify_merge(
                base,
                staging,
                all_targets,
                compute_dtype=dtype or target_dtype,
                nf4_weights={n: ST_DTYPES[index[n].dtype][1] for n in sorted(nf4_names)},
                out_dtype=dtype,
                text_only=text_only,
            )
            report.seconds["verify"] = report.verification["seconds"]
        report.seconds["total"] = round(time.perf_counter() - started, 3)
        report.write(staging)
        if report.verification is not None and not report.verification["ok"]:
            raise MergeError(f"verification failed: {report.verification['summary']}")
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        raise
    finally:
        os.close(lock)
    return report


# ---------------------------------------------------------------------------------------------
# The output: checked before any work, written beside itself, swapped in at the end


def check_output(output: Path, overwrite: bool, protected: Mapping[str, Path]) -> None:
    """A one-line refusal of the (absolute) output path: a parent that is not a directory, an
    output that exists without --overwrite, or one whose replacement would delete the inputs or
    the directory this runs in."""
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MergeError(f"output {output}: its parent {parent} is not a directory")
            break
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise MergeError(f"output {output} exists; pass --overwrite to replace it")
        for what, path in {**protected, "current directory": Path.cwd()}.items():
            path = path.resolve()
            if path == output or output in path.parents:
                raise MergeError(f"output {output} holds the {what} ({path}); --overwrite would delete it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _locked(path: Path) -> bool:
    """Whether a live merge holds ``path``: its staging directory, or the output that became.
    A flock outlives no process, and is seen from any PID namespace that shares the file system."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # and with it the probe's own lock
    return False


def make_staging(output: Path) -> tuple[Path, int]:
    """The staging directory ``.NAME.partial-PID-XXXXXXXX`` beside ``output``, and a descriptor
    holding its flock until the merge ends (see clean_stale)."""
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        lock = os.open(staging, os.O_RDONLY)
    except BaseException:
        staging.rmdir()
        raise
    fcntl.flock(lock, fcntl.LOCK_EX)  # cannot block: the directory is new
    return staging, lock


def clean_stale(output: Path) -> None:
    """Remove what killed runs left beside ``output``: staging directories
    (``.NAME.partial-PID-XXXXXXXX``, hex) and, from a kill in the middle of a replacement, the
    previous output (``.NAME.old-PID``), which is put back when ``output`` itself is missing.
    Only names exactly of those forms, owned by this user, whose process is gone and whose
    staging (or the output it became) no live merge holds locked; best effort, never an error."""
    if not output.parent.is_dir():
        return
    name = re.escape(output.name)
    staging = re.compile(rf"^\.{name}\.partial-(?P<pid>\d+)-[0-9a-f]{{8}}$")
    old = re.compile(rf"^\.{name}\.old-(?P<pid>\d+)$")
    for leftover in sorted(output.parent.iterdir()):
        match = staging.match(leftover.name) or old.match(leftover.name)
        try:
            if (
                match is None
                or leftover.lstat().st_uid != os.getuid()
                or _pid_alive(int(match["pid"]))
                or _locked(leftover)
            ):
                continue
            if match.re is staging:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
            elif output.exists() or output.is_symlink():
                if not _locked(output):  # else its run is live, about to remove this itself
                    _remove(leftover)
            else:
                leftover.rename(output)
        except OSError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failure can take them back."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_created(created: Sequence[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()  # only while empty: never anything another process put there
        except OSError:
            break


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside wait until it is left, then go to their handlers.
    Python runs signal handlers in the main thread only, so elsewhere there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {
        signum: signal.signal(signum, lambda received, _frame: caught.append(received))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


def _replace_dir(staging: Path, output: Path) -> None:
    """Move ``staging`` to ``output``, the previous output aside first and then away. SIGINT and
    SIGTERM wait until this is done (or undone): no signal leaves the output missing or the old
    one beside it. Only SIGKILL can land in between; clean_stale puts the old output back then."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    with _signals_deferred():
        moved = output.exists() or output.is_symlink()
        if moved:
            output.rename(old)
        try:
            staging.rename(output)
        except BaseException:
            if moved:
                old.rename(output)
            raise
        if moved:
            with contextlib.suppress(OSError):  # the new output is in; the next run's clean_stale retries
                _remove(old)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="base model: local directory or hub id")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter: local directory or hub id")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (atomically)")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="output dtype (auto: keep the base's)"
    )
    parser.add_argument(
        "--text-only", action="store_true", help="write Gemma4ForCausalLM (language model only)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--base-weights",
        choices=["as-is", "nf4"],
        default="as-is",
        help="nf4: round-trip the language model's linear weights through NF4 (blocksize 64, double "
        "quantization) before merging, i.e. merge into the base a QLoRA adapter was trained on",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the merged model's logits with the base's plus the adapter unmerged; "
        "on failure exit non-zero and write nothing",
    )
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that the staging directory is removed on the way out."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _error(message: str) -> None:
    print(f"merge_adapter: error: {' '.join(message.split())}", file=sys.stderr)  # one line, always


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only the main thread may set handlers; elsewhere SIGTERM keeps its default.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _main(args)
    except MergeError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # permissions, a full disk, a read-only file system...: one line too
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}; nothing was written")
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        _error("interrupted; nothing was written")
        return 128 + (exc.args[0] if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    base = resolve(args.base, "base", ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"])
    adapter = resolve(args.adapter, "adapter", ["adapter_config.json", "adapter_model.safetensors"])
    report = merge(
        base,
        adapter,
        args.output,
        dtype_name=args.dtype,
        text_only=args.text_only,
        overwrite=args.overwrite,
        base_weights=args.base_weights,
        verify=args.verify,
    )
    verified = f", verified: {report.verification['summary']}" if report.verification else ""
    print(
        f"merged {len(report.merged)} language-model and {len(report.merged_tower)} tower weights "
        f"(skipped {len(report.skipped_tower)} tower LoRA pairs), copied {report.copied_tensors} "
        f"and cast {report.cast_tensors} tensors -> {report.output} [{report.layout}, "
        f"{report.seconds['total']:.1f}s, peak RSS {report.peak_rss_mib:.0f} MiB{verified}]"
    )
    return 0


if __name__ == "__main__":
    # Through the importable module, so that verify_merge raises the very MergeError caught here.
    from merge_adapter import main as _entry

    sys.exit(_entry())

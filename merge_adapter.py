"""Merge a PEFT LoRA adapter into Gemma 4 base weights, tensor by tensor, straight from safetensors.

    python merge_adapter.py --base google/gemma-4-E4B-it \
        --adapter Shubh-0789/gemma4-clinical-endpoint-extractor --output merged/ [--text-only]

W' = W + scale * B @ A in fp32 (scale = alpha / r, or alpha / sqrt(r) with rsLoRA); every other
tensor is copied unchanged. One input shard is held at a time. Tower LoRA tensors saved under the
model card's monkey-patched names (``...q_proj.lora_A``) are mapped onto the real weights
(``...q_proj.linear.weight``), or skipped with ``--text-only``, which writes a ``Gemma4ForCausalLM``
checkpoint of the language model alone (what vLLM's CPU build can serve). The output is written to
a temporary directory next to ``--output`` and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LM_PREFIX = "model.language_model."
# Files copied from the base as they are. Processor files only matter for the multimodal layout.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


class MergeError(Exception):
    """A merge that cannot be done faithfully. The message is one line and names the culprit."""


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass
class Report:
    base: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    layout: str = "full"
    dtype: str = "auto"
    scale: float = 0.0
    use_rslora: bool = False
    merged: list[str] = field(default_factory=list)
    merged_tower: list[str] = field(default_factory=list)
    skipped_tower: list[str] = field(default_factory=list)
    skipped_tower_max_abs_b: float = 0.0
    copied_tensors: int = 0
    dropped_tensors: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    verification: dict[str, Any] | None = None


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


def weight_files(base: Path) -> list[Path]:
    index = base / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base / n for n in names]
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise MergeError(f"base {base} holds no *.safetensors weights")
    return files


def base_index(files: Sequence[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every base tensor name -> (file, shape), read from headers only."""
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                index[key] = (file, tuple(f.get_slice(key).get_shape()))
    return index


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule: a pattern key matches a module name ending in it (or as a full regex).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(adapter: Path) -> tuple[dict[str, Any], dict[str, LoraPair]]:
    config_path = adapter / "adapter_config.json"
    if not config_path.exists():
        raise MergeError(f"adapter {adapter} has no adapter_config.json")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"adapter peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise MergeError("adapter uses DoRA (use_dora=true): its magnitude vector cannot be merged as W + BA")
    if config.get("fan_in_fan_out"):
        raise MergeError("adapter has fan_in_fan_out=true (Conv1D layout), which Gemma 4 never uses")
    if config.get("bias", "none") != "none":
        raise MergeError(f"adapter trains biases (bias={config['bias']!r}); only bias='none' is merged")
    if config.get("modules_to_save"):
        raise MergeError(f"adapter has modules_to_save={config['modules_to_save']}; not supported")
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise MergeError(f"adapter {adapter} has no adapter_model.safetensors")

    halves: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            match = ADAPTER_KEY.match(key)
            if match is None:
                raise MergeError(f"adapter tensor {key!r} is not a LoRA A/B weight; cannot merge it")
            halves.setdefault(match["module"], {})[match["ab"]] = f.get_tensor(key)

    alpha, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    targets = config.get("target_modules") or []
    pairs: dict[str, LoraPair] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"adapter module {module!r} has lora_{''.join(ab)} but not its twin")
        if isinstance(targets, list) and targets and module.rsplit(".", 1)[-1] not in targets:
            raise MergeError(f"adapter module {module!r} is not among target_modules {targets}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise MergeError(
                f"adapter module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain"
            )
        rank = a.shape[0]
        mod_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scale = mod_alpha / math.sqrt(rank) if rslora else mod_alpha / rank
        pairs[module] = LoraPair(module, a, b, float(scale))
    if not pairs:
        raise MergeError(f"adapter {adapter} holds no LoRA tensors")
    return config, pairs


def plan_targets(
    pairs: dict[str, LoraPair], index: dict[str, tuple[Path, tuple[int, ...]]]
) -> dict[str, LoraPair]:
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
        if index[key][1] != expected:
            raise MergeError(
                f"shape mismatch for {key}: base {index[key][1]}, adapter B@A {expected}: "
                "adapter trained on another base?"
            )
        targets[key] = pair
    return targets


# ---------------------------------------------------------------------------------------------
# Merge


def merged_tensor(weight: torch.Tensor, pair: LoraPair, dtype: torch.dtype) -> torch.Tensor:
    delta = pair.b.to(torch.float32) @ pair.a.to(torch.float32)
    return (weight.to(torch.float32) + pair.scale * delta).to(dtype).contiguous()


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


def iter_shard(
    file: Path,
    targets: dict[str, LoraPair],
    dtype: torch.dtype | None,
    text_only: bool,
    report: Report,
) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            name = output_name(key, text_only)
            if name is None:
                report.dropped_tensors += 1
                continue
            tensor = f.get_tensor(key)
            out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            if key in targets:
                yield name, merged_tensor(tensor, targets[key], out_dtype)
                (report.merged if is_language_model(key) else report.merged_tower).append(key)
            else:
                yield name, tensor.to(out_dtype)
                report.copied_tensors += 1


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


def merge(
    base: Path,
    adapter: Path,
    output: Path,
    *,
    dtype_name: str = "auto",
    text_only: bool = False,
    overwrite: bool = False,
) -> Report:
    started = time.perf_counter()
    output = output.resolve()
    if output.exists() and not overwrite:
        raise MergeError(f"output {output} exists; pass --overwrite to replace it")
    config_path = base / "config.json"
    if not config_path.exists():
        raise MergeError(f"base {base} has no config.json")
    config = json.loads(config_path.read_text())
    files = weight_files(base)
    index = base_index(files)
    adapter_config, pairs = load_adapter(adapter)
    targets = plan_targets(pairs, index)
    dtype = DTYPES[dtype_name] if dtype_name != "auto" else None

    report = Report(
        output=str(output),
        layout="text-only" if text_only else "full",
        dtype=dtype_name,
        use_rslora=bool(adapter_config.get("use_rslora", False)),
        scale=next(iter(pairs.values())).scale,
    )
    report.base = {"path": str(base), "files": {f.name: sha256(f) for f in files}}
    report.adapter = {
        "path": str(adapter),
        "files": {n: sha256(adapter / n) for n in ("adapter_config.json", "adapter_model.safetensors")},
        "r": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "target_modules": adapter_config.get("target_modules"),
    }
    if text_only:
        for key in [k for k in targets if not is_language_model(k)]:
            pair = targets.pop(key)
            report.skipped_tower.append(key)
            report.skipped_tower_max_abs_b = max(report.skipped_tower_max_abs_b, float(pair.b.abs().max()))
    report.seconds["plan"] = round(time.perf_counter() - started, 3)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        weight_map: dict[str, str] = {}
        for file in files:
            tensors = dict(iter_shard(file, targets, dtype, text_only, report))
            if tensors:
                save_file(tensors, staging / file.name, metadata={"format": "pt"})
                weight_map.update({name: file.name for name in tensors})
            del tensors
        if len(files) > 1:
            index_doc = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        report.seconds["merge"] = round(time.perf_counter() - started - report.seconds["plan"], 3)

        out_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype_name)
        out_config = text_only_config(config, out_dtype) if text_only else dict(config)
        out_config.pop("quantization_config", None)
        if not text_only and out_dtype:
            out_config["dtype"] = out_dtype
        (staging / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for name in TOKENIZER_FILES + (() if text_only else PROCESSOR_FILES):
            if (base / name).exists():
                shutil.copy2(base / name, staging / name)

        report.seconds["total"] = round(time.perf_counter() - started, 3)
        (staging / "merge_report.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _replace_dir(staging: Path, output: Path) -> None:
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


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
        "--verify", action="store_true", help="compare merged logits with the unmerged adapter's"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base = resolve(args.base, "base", ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"])
        adapter = resolve(args.adapter, "adapter", ["adapter_config.json", "adapter_model.safetensors"])
        report = merge(
            base,
            adapter,
            args.output,
            dtype_name=args.dtype,
            text_only=args.text_only,
            overwrite=args.overwrite,
        )
        if args.verify:
            from verify_merge import verify  # noqa: PLC0415 - heavy, only with --verify

            report.verification = verify(base, adapter, args.output)
            (args.output / "merge_report.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
            if not report.verification["ok"]:
                raise MergeError(f"verification failed: {report.verification['summary']}")
    except MergeError as exc:
        print(f"merge_adapter: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"merged {len(report.merged)} language-model and {len(report.merged_tower)} tower weights "
        f"(skipped {len(report.skipped_tower)} tower LoRA pairs), copied {report.copied_tensors} "
        f"tensors -> {report.output} [{report.layout}, {report.seconds['total']:.1f}s]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

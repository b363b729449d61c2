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

This file is the command and the merge's plan; the parts it runs are the ``merge`` package's
(see merge/__init__.py), which --verify's checks (merge/verify.py) share without importing this.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.errors import MergeError, first_line
from merge.layout import (
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    is_language_model,
    output_config,
    output_name,
    text_only_config,
)
from merge.lora import LoraPair, load_adapter, merged_tensor, plan_targets
from merge.nf4 import NF4_BLOCKSIZE, lm_linear_weights, nf4_roundtrip
from merge.output import (
    check_output,
    clean_stale,
    make_parents,
    make_staging,
    remove_created,
    replace_dir,
    write_text,
)
from merge.safetensors_io import (
    CASTABLE,
    INDEX_NAME,
    ST_DTYPES,
    ST_NAME,
    Entry,
    base_index,
    index_problems,
    read_header,
    read_json,
    weight_files,
)
from merge.verify import verify as verify_merge
from merge.write import Planned, write_shard

# What callers import from here (serve.launcher, benchmarks, tests): the command's module stays
# the front door, whichever merge/ module now holds each name.
__all__ = [
    "DTYPES",
    "CASTABLE",
    "ST_DTYPES",
    "ST_NAME",
    "Entry",
    "LoraPair",
    "MergeError",
    "Report",
    "base_index",
    "build_parser",
    "load_adapter",
    "main",
    "merge",
    "merged_tensor",
    "nf4_roundtrip",
    "output_name",
    "peak_rss_mib",
    "plan_targets",
    "text_only_config",
    "weight_files",
    "write_shard",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Report:
    base: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    output: str = ""
    layout: str = "full"
    dtype: str = "auto"
    base_weights: str = "as-is"
    scale: float | None = 0.0  # None: no module takes the top-level r and lora_alpha
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
        write_text(directory / "merge_report.json", json.dumps(asdict(self), indent=2) + "\n")


def _default_scale(rank: Any, alpha: Any, rslora: bool) -> float | None:
    """The scale of the modules no pattern overrides; None where the top-level r or lora_alpha is
    unusable, which PEFT allows when rank_pattern / alpha_pattern cover every module (load_adapter
    checks each module's own values)."""
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (rank, alpha)):
        return None
    try:
        scale = alpha / (math.sqrt(rank) if rslora else rank)
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    return float(scale) if math.isfinite(scale) else None


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
        raise MergeError(
            f"{what} {name_or_path!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({first_line(exc)}); download it where a network exists and pass the directory"
        ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    if quantization := config.get("quantization_config"):
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise MergeError(f"base {base} is quantized ({method}); merge into the unquantized base")
    files = weight_files(base)
    index = base_index(files)
    broken = index_problems(base, index)
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise MergeError(f"{broken[0]}{more}: the base is incomplete, so the merge would drop the tensor")
    adapter_config, pairs = load_adapter(adapter)
    all_targets = plan_targets(pairs, index)
    targets = dict(all_targets)
    dtype = DTYPES[dtype_name] if dtype_name != "auto" else None
    nf4_names = set(lm_linear_weights(base, index)) if base_weights == "nf4" else set()

    rslora = bool(adapter_config.get("use_rslora", False))
    rank, alpha = adapter_config.get("r", 8), adapter_config.get("lora_alpha", 8)
    default_scale = _default_scale(rank, alpha, rslora)
    report = Report(
        output=str(output),
        layout="text-only" if text_only else "full",
        dtype=dtype_name,
        base_weights=base_weights,
        use_rslora=rslora,
        scale=default_scale,
        scale_overrides={
            p.module: p.scale
            for p in pairs.values()
            if default_scale is None or not math.isclose(p.scale, default_scale)
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
        if (base / INDEX_NAME).exists():
            base_meta = read_json(base / INDEX_NAME, "base index").get("metadata") or {}
            if not isinstance(base_meta, dict):
                base_meta = {}
            index_meta = {**base_meta, "total_size": total_bytes}
            if "total_parameters" in base_meta:
                index_meta["total_parameters"] = total_params
            index_doc = {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}
            write_text(staging / INDEX_NAME, json.dumps(index_doc, indent=2) + "\n")
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

        out_config = output_config(config, dtype_name, text_only)
        write_text(staging / "config.json", json.dumps(out_config, indent=2) + "\n")
        for name in TOKENIZER_FILES + (() if text_only else PROCESSOR_FILES):
            if (base / name).exists():
                shutil.copy2(base / name, staging / name)
        report.peak_rss_mib = peak_rss_mib()

        if verify:
            target_dtype = ST_DTYPES[index[next(iter(all_targets))].dtype][1]
            report.verification = verify_merge(
                base,
                staging,
                adapter,
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
        replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        raise
    finally:
        os.close(lock)
    return report


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
        # A two-path error (shutil's copies, a rename) has the source in filename and the file
        # being written in filename2: that is the one a full disk or a read-only target is about.
        culprit = exc.filename2 or exc.filename
        where = f": {culprit}" if culprit else ""
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
    sys.exit(main())

"""Benchmark: merge_adapter.py vs PEFT's merge_and_unload + save_pretrained, time and peak RSS.

    python benchmarks/merge_vs_peft.py [--layers 8] [--vocab 65536] [--shard-mb 500] [--workdir /tmp]

Builds a random checkpoint in the google/gemma-4-E4B-it layout (the real widths: hidden 2560, MLP
10240, head dims 256/512, per-layer inputs 256; fewer layers and a smaller vocabulary, so that it
is a few GB), written shard by shard in bf16, plus a rank-16 LoRA adapter on the language model's
seven projections. Then runs each merge in its own subprocess, one after the other on the same
warm page cache, and reports wall time (process start to exit, imports included) and peak RSS (the
child's own VmHWM, printed by it as it ends) with the ratios ours / PEFT. Everything is written under one
temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_TARGETS = rf".*language_model.*\.({'|'.join(TARGETS)})"
RANK = 16


def gemma4_config(layers: int, vocab: int) -> Any:
    from transformers import Gemma4Config

    text = {
        "vocab_size": vocab,
        "vocab_size_per_layer_input": vocab,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "global_head_dim": 512,
        "hidden_size_per_layer_input": 256,
        "num_kv_shared_layers": max(layers // 4, 1),
        "sliding_window": 512,
        "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * (layers // 4)
        + ["sliding_attention"] * (layers % 4),
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    }
    # Small towers: they exist (their keys and clip buffers are part of the layout) but the
    # language model is what a LoRA merge is about.
    config = Gemma4Config(
        text_config=text,
        vision_config={
            "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
            "position_embedding_size": 256, "use_clipped_linears": True,
        },
        audio_config={
            "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "subsampling_conv_channels": [32, 16], "output_proj_dims": 256,
        },
        tie_word_embeddings=True,
    )  # fmt: skip
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return config


def _random(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if name.endswith(("input_min", "output_min")):
        return torch.full(shape, -8.0)
    if name.endswith(("input_max", "output_max")):
        return torch.full(shape, 8.0)
    if len(shape) <= 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * 0.02


def write_base(out: Path, layers: int, vocab: int, shard_bytes: int) -> int:
    """Write the checkpoint one shard at a time (never the whole model in memory); its size in bytes."""
    from safetensors.torch import save_file
    from transformers import Gemma4ForConditionalGeneration

    out.mkdir(parents=True)
    config = gemma4_config(layers, vocab)
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    tied = set(model.all_tied_weights_keys)
    shapes = [(k, v.shape) for k, v in model.state_dict().items() if k not in tied]
    gen = torch.Generator().manual_seed(0)
    parts: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}

    def flush() -> None:
        save_file(current, out / f"part-{len(parts)}.safetensors", metadata={"format": "pt"})
        parts.append(sorted(current))
        current.clear()

    total = current_bytes = 0
    for name, shape in shapes:
        nbytes = shape.numel() * 2
        if current and current_bytes + nbytes > shard_bytes:
            flush()
            current_bytes = 0
        current[name] = _random(name, shape, gen).to(torch.bfloat16)
        current_bytes += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, keys in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    return total


def write_adapter(base: Path, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                module = key.removesuffix(".weight")
                if ".language_model." in key and module.rsplit(".", 1)[-1] in TARGETS:
                    out_f, in_f = f.get_slice(key).get_shape()
                    tensors[f"base_model.model.{module}.lora_A.weight"] = (
                        torch.randn(RANK, in_f, generator=gen) / in_f**0.5
                    )
                    tensors[f"base_model.model.{module}.lora_B.weight"] = (
                        torch.randn(out_f, RANK, generator=gen) * 0.02
                    )
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": RANK,
        "lora_dropout": 0.0,
        # A regex, so that PEFT leaves the towers' Gemma4ClippableLinear alone (it cannot wrap them).
        "target_modules": LM_TARGETS,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def child(kind: str, base: str, adapter: str, output: str) -> None:
    """One merge, run in its own process; prints its peak RSS (VmHWM) as JSON."""
    sys.path.insert(0, str(ROOT))
    import merge_adapter

    if kind == "ours":
        code = merge_adapter.main(["--base", base, "--adapter", adapter, "--output", output])
        if code:
            raise SystemExit(code)
    else:  # What a PEFT user runs: load in the base's dtype, attach, merge_and_unload, save_pretrained.
        from peft import PeftModel
        from transformers import Gemma4ForConditionalGeneration

        model = Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(output)
    print(json.dumps({"peak_rss_mib": merge_adapter.peak_rss_mib()}))


def run_child(kind: str, base: Path, adapter: Path, output: Path) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, __file__, "--child", kind, str(base), str(adapter), str(output)]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{kind} merge failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def spot_check(ours: Path, theirs: Path, keys: list[str]) -> float:
    """Largest |difference| between the two outputs over a few merged weights (bf16 rounding only)."""
    from safetensors import safe_open

    def find(directory: Path, key: str) -> torch.Tensor:
        for file in directory.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                if key in f.keys():
                    return f.get_tensor(key).float()
        raise KeyError(key)

    return max(float((find(ours, k) - find(theirs, k)).abs().max()) for k in keys)


def versions() -> str:
    import peft
    import safetensors
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, safetensors {safetensors.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (E4B has 42)")
    parser.add_argument("--vocab", type=int, default=65536, help="vocabulary (E4B has 262144)")
    parser.add_argument("--shard-mb", type=int, default=500, help="base shard size in MB")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary directory goes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each merge (medians reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--child", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    tmp = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        base, adapter = tmp / "base", tmp / "adapter"
        started = time.perf_counter()
        size = write_base(base, args.layers, args.vocab, args.shard_mb * 10**6)
        write_adapter(base, adapter)
        shards = len(list(base.glob("*.safetensors")))
        print(
            f"synthetic base: {size / 1e9:.2f} GB bf16 in {shards} shards, built in {time.perf_counter() - started:.0f}s"
        )

        runs: dict[str, list[dict[str, float]]] = {"ours": [], "peft": []}
        diff = 0.0
        for _ in range(args.repeat):  # alternating, so that drift in the machine's load hits both
            for kind in ("ours", "peft"):
                shutil.rmtree(tmp / kind, ignore_errors=True)
                runs[kind].append(run_child(kind, base, adapter, tmp / kind))
            report = json.loads((tmp / "ours" / "merge_report.json").read_text())
            diff = max(
                diff, spot_check(tmp / "ours", tmp / "peft", report["merged"][:3] + report["merged"][-3:])
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    median = {
        kind: {key: statistics.median(run[key] for run in kind_runs) for key in ("wall_s", "peak_rss_mib")}
        for kind, kind_runs in runs.items()
    }
    results = {
        "base_gb": round(size / 1e9, 3),
        "shards": shards,
        "merged_weights": len(report["merged"]),
        "repeat": args.repeat,
        "median": median,
        "runs": runs,
        "time_ratio": round(median["ours"]["wall_s"] / median["peft"]["wall_s"], 3),
        "rss_ratio": round(median["ours"]["peak_rss_mib"] / median["peft"]["peak_rss_mib"], 3),
        "max_abs_diff_spot_check": diff,
        "versions": versions(),
    }
    print(
        f"\n| {results['base_gb']} GB base, {shards} shards, median of {args.repeat} | wall s | peak RSS MiB |"
    )
    print("|---|---:|---:|")
    for kind, label in (("ours", "merge_adapter.py"), ("peft", "PEFT merge_and_unload + save_pretrained")):
        print(f"| {label} | {median[kind]['wall_s']:.1f} | {median[kind]['peak_rss_mib']:.0f} |")
    print(f"| ratio (ours / PEFT) | {results['time_ratio']:.2f}x | {results['rss_ratio']:.2f}x |")
    for kind in runs:
        print(
            f"{kind} runs (wall s, MiB): "
            + ", ".join(f"{r['wall_s']:.1f}/{r['peak_rss_mib']:.0f}" for r in runs[kind])
        )
    print(f"spot check, max |ours - PEFT| over 6 merged weights: {diff:.3g}; {results['versions']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

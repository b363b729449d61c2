"""CPU cost of schema-guided decoding per generated token, measured on xgrammar directly.

    python benchmarks/grammar_cost.py TOKENIZER_DIR [--vocab-size 262144] [--any-whitespace]

vLLM fills one token bitmask per guided request per decoding step on the engine's CPU thread
(in parallel only above 128 guided requests in the batch) and advances each request's matcher
with the sampled token. This times exactly those two calls, ``fill_next_token_bitmask`` and
``accept_token``, over three token streams:

* ``gold-spaced``: the gold answers as the server emits them (xgrammar without free whitespace
  writes ``{"a": 1, "b": 2}``);
* ``gold-pretty``: the same answers pretty-printed as the seed's model writes them (needs
  ``--any-whitespace``, as the grammar must allow the whitespace);
* ``endless-string``: what a random-weight model does under the grammar: open the first string
  value and never close it.

Multiply the per-token cost by the batch size to get the CPU time a decoding step spends on the
grammar; compare it with the GPU's step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.workload import GOLD, card_pretty_json, load, spaced_json  # noqa: E402
from client.models import endpoint_json_schema  # noqa: E402


def time_stream(
    compiled, xgr, token_ids: list[int], vocab_size: int, torch
) -> tuple[list[float], list[float], bool]:  # type: ignore[no-untyped-def]
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    fills, accepts = [], []
    for token in token_ids:
        # Thread CPU time, not wall time: on a busy machine preemption would inflate wall time.
        t0 = time.thread_time()
        matcher.fill_next_token_bitmask(bitmask, 0)
        t1 = time.thread_time()
        accepted = matcher.accept_token(token)
        t2 = time.thread_time()
        fills.append(t1 - t0)
        accepts.append(t2 - t1)
        if not accepted:
            return fills, accepts, False
    return fills, accepts, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="directory (or hub id) of a Hugging Face tokenizer")
    parser.add_argument("--vocab-size", type=int, default=None, help="the model's vocabulary (logits) size")
    parser.add_argument("--any-whitespace", action="store_true", help="grammar allows free whitespace")
    parser.add_argument("--endless-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = args.vocab_size or len(tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(endpoint_json_schema()), any_whitespace=args.any_whitespace
    )
    compile_s = time.perf_counter() - t0

    gold = load(GOLD)
    streams: dict[str, list[list[int]]] = {"gold-spaced": [], "endless-string": []}
    if args.any_whitespace:
        streams["gold-pretty"] = []
    for item in gold:
        assert item.expected is not None
        streams["gold-spaced"].append(tokenizer.encode(spaced_json(item.expected), add_special_tokens=False))
        if args.any_whitespace:
            streams["gold-pretty"].append(
                tokenizer.encode(card_pretty_json(item.expected), add_special_tokens=False)
            )
    head = tokenizer.encode('{"endpoints": [{"endpoint_name_standardized": "', add_special_tokens=False)
    word = tokenizer.encode("survival", add_special_tokens=False)
    for _ in range(8):
        streams["endless-string"].append(head + (word * args.endless_tokens)[: args.endless_tokens])

    eos = [int(tokenizer.eos_token_id)]
    results: dict[str, object] = {
        "tokenizer": args.tokenizer,
        "tokenizer_entries": len(tokenizer),
        "vocab_size": vocab_size,
        "any_whitespace": args.any_whitespace,
        "compile_s": round(compile_s, 4),
        "xgrammar": xgr.__version__ if hasattr(xgr, "__version__") else "?",
        "torch_threads": torch.get_num_threads(),
    }
    print(f"compile: {compile_s * 1e3:.1f} ms  (tokenizer {len(tokenizer)} entries, vocab {vocab_size})")
    for name, token_streams in streams.items():
        fills: list[float] = []
        accepts: list[float] = []
        lengths, rejected = [], 0
        for ids in token_streams:
            f, a, ok = time_stream(
                compiled, xgr, ids + (eos if name != "endless-string" else []), vocab_size, torch
            )
            fills += f
            accepts += a
            lengths.append(len(ids))
            rejected += not ok
        row = {
            "streams": len(token_streams),
            "rejected": rejected,
            "mean_tokens": round(statistics.fmean(lengths), 1),
            "fill_us_mean": round(statistics.fmean(fills) * 1e6, 2),
            "fill_us_p99": round(sorted(fills)[int(0.99 * (len(fills) - 1))] * 1e6, 2),
            "accept_us_mean": round(statistics.fmean(accepts) * 1e6, 2),
        }
        results[name] = row
        print(
            f"{name:15} streams={row['streams']:<3} rejected={rejected} tokens/answer={row['mean_tokens']:6.1f} "
            f"fill={row['fill_us_mean']:8.2f} us (p99 {row['fill_us_p99']:8.2f})  accept={row['accept_us_mean']:6.2f} us"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

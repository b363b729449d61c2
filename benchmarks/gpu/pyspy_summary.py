"""Summarise a py-spy raw (collapsed-stack) profile of vLLM's engine process: where its main thread
spends its samples, grouped by the stage of a decoding step its stack is in.

    python benchmarks/gpu/pyspy_summary.py PROFILE.txt [--thread MainThread] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys
from pathlib import Path

# The first stage whose key appears anywhere in a stack names it, so specific stages come first.
STAGES = [
    ("grammar: accept tokens", ("accept_tokens",)),
    (
        "grammar: fill bitmasks (scheduler)",
        ("Scheduler.get_grammar_bitmask", "StructuredOutputManager.grammar_bitmask"),
    ),
    ("grammar: apply bitmask (runner)", ("apply_grammar_bitmask",)),
    ("sync for logits processors' output ids", ("update_async_output_token_ids",)),
    ("benchmark steering (steer.py)", ("SteerToText",)),
    ("sample", ("sample_tokens",)),
    ("execute model", ("execute_model",)),
    ("schedule", ("Scheduler.schedule", "AsyncScheduler.schedule")),
    ("update from output", ("update_from_output",)),
    ("idle: waiting for requests", ("_process_input_queue",)),
]


def stage_of(frames: list[str]) -> str:
    for name, keys in STAGES:
        if any(k in frame for frame in frames for k in keys):
            return name
    return "other: " + re.sub(r" \(.*", "", frames[-1]) if frames else "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--thread", default="MainThread")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    opener = gzip.open if args.profile.suffix == ".gz" else open
    with opener(args.profile, "rt") as f:
        lines = f.read().splitlines()
    for line in lines:
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2 or args.thread not in frames[0] + frames[1]:
            continue
        counts[stage_of(frames[1:])] += int(n)
    total = sum(counts.values()) or 1
    for name, n in counts.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {name}")
    print(f"{total} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())

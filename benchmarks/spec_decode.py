"""Speculative decoding under the endpoint grammar: for each variant (a name and the vLLM arguments
that select a drafter), start ``python -m serve`` once, collect the greedy answer to every gold
text, run ``throughput.py`` guided through the product's one URL, read vLLM's draft counters, stop
it, and write one JSON (rewritten after each variant, so a run cut short keeps what it measured).

    # GPU (the kit's vLLM, the E4B stand-in with dummy weights, steered to the gold answers):
    python benchmarks/spec_decode.py --model /tmp/standin --concurrency 64,256 --duration 12 \\
        --variant base= \\
        --variant 'ngram-k2=--speculative-config {"method":"ngram","num_speculative_tokens":2,"prompt_lookup_max":4,"prompt_lookup_min":2}' \\
        --out $OUT/spec.json -- --load-format dummy --attention-backend TRITON_ATTN

    # CPU smoke run on the tiny demo model:
    python benchmarks/spec_decode.py --demo --concurrency 2 --duration 2 --ramp 1 --max-tokens 64 \\
        --variant base= --out /tmp/spec.json

A variant is ``NAME=ARGS`` (ARGS split like a shell line; empty for the baseline) and may start
with ``engines=N`` to run it behind ``--engines N``. Every server is steered with
``benchmarks/steer_spec.py`` (vLLM refuses custom logits processors once a drafter is on, so the
steering sits in the model runner, the same for every variant) and by prompt, so the requests pass
the schema policy as users' do. Per variant: start-up time, drafts, draft tokens and accepted
tokens in the throughput window (acceptance rate, mean tokens per engine step), the throughput
points, and whether every greedy answer equals the first variant's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.engines import POINT_KEYS, STEER_FROM_PROMPT_ENV, Config, Server, run_meta, write  # noqa: E402
from benchmarks.workload import GOLD, STYLES, load  # noqa: E402
from client.prompt import build_messages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
STEERING = ["--worker-extension-cls", "benchmarks.steer_spec.SteerWorkerExtension"]
COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
}


def parse_variant(text: str) -> tuple[str, int, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: a variant is NAME=ARGS (ARGS may be empty)")
    words = shlex.split(rest)
    engines = 1
    if words and words[0].startswith("engines="):
        count = words.pop(0).removeprefix("engines=")
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: engines=N needs a whole number >= 1")
        engines = int(count)
    return name.strip(), engines, words


def counters(root: str, engines: int) -> dict[str, float]:
    """vLLM's draft and token counters, summed over engines (``/engines/<i>/metrics`` behind the
    balancer)."""
    paths = ["/metrics"] if engines == 1 else [f"/engines/{i}/metrics" for i in range(engines)]
    totals = dict.fromkeys(COUNTERS, 0.0)
    for path in paths:
        text = httpx.get(root + path, timeout=30).text
        for line in text.splitlines():
            for key, name in COUNTERS.items():
                if line.startswith(name + "{") or line.startswith(name + " "):
                    totals[key] += float(line.rsplit(" ", 1)[1])
    return totals


async def greedy_answers(base_url: str, max_tokens: int, concurrency: int) -> dict[str, str | None]:
    """Each gold text's answer at temperature 0, as a user's request sends it (the server adds the
    schema); None where the request failed."""
    items = load(GOLD)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:

        async def one(text: str) -> str | None:
            body = {"model": "endpoint-extractor", "messages": build_messages(text), "temperature": 0.0,
                    "max_tokens": max_tokens}  # fmt: skip
            async with gate:
                response = await client.post("/chat/completions", json=body)
            return (
                response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
            )

        texts = await asyncio.gather(*(one(i.text) for i in items))
    return {i.id: t for i, t in zip(items, texts, strict=True)}


def throughput_argv(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    return [
        sys.executable, str(THROUGHPUT),
        "--base-url", f"http://127.0.0.1:{args.port}/v1",
        "--concurrency", ",".join(map(str, args.concurrency)),
        "--modes", "guided",
        "--duration", str(args.duration),
        "--ramp", str(args.ramp),
        "--steer", args.steer,
        "--steer-from-prompt",
        "--max-tokens", str(args.max_tokens),
        "--warmup", str(args.warmup),
        "--label", f"variant={name}",
        "--out", str(out),
    ]  # fmt: skip


def measure(
    args: argparse.Namespace, name: str, engines: int, extra: list[str], work: Path
) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "engines": engines, "vllm_args": extra}
    server_args = argparse.Namespace(**{**vars(args), "serve_args": [*args.serve_args, *STEERING, *extra]})
    server = Server(server_args, Config(engines), work / f"serve-{name}.log")
    started = time.monotonic()
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        row["startup_s"] = round(time.monotonic() - started, 1)
        base_url = server.root + "/v1"
        answers = asyncio.run(greedy_answers(base_url, args.max_tokens, 32))
        row["answers"] = answers
        target = {i.id: STYLES[args.steer](i.expected) for i in load(GOLD) if i.expected is not None}
        row["answers_exact"] = sum(answers[k] == v for k, v in target.items())
        before = counters(server.root, engines)
        out = work / f"throughput-{name}.json"
        with (work / f"throughput-{name}.log").open("wb") as sink:
            row["throughput_exit_code"] = subprocess.run(
                throughput_argv(args, name, out), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
            ).returncode
        after = counters(server.root, engines)
        delta = {k: after[k] - before[k] for k in COUNTERS}
        row["counters"] = delta
        if delta["draft_tokens"]:
            row["acceptance_rate"] = round(delta["accepted_tokens"] / delta["draft_tokens"], 3)
        if delta["drafts"]:
            # Each verification step writes its accepted drafts plus one token of the target's own.
            row["tokens_per_step"] = round(1 + delta["accepted_tokens"] / delta["drafts"], 3)
        results = json.loads(out.read_text()) if out.exists() else {"points": []}
        row["points"] = [{k: p.get(k) for k in POINT_KEYS} for p in results["points"]]
    except (RuntimeError, httpx.HTTPError, ValueError, KeyError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        row["stop_exit_code"] = server.stop()
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reference = next((r.get("answers") for r in rows if r.get("answers")), None)
    summary = []
    for row in rows:
        answers = row.get("answers")
        line = {
            "variant": row["variant"],
            "engines": row["engines"],
            "startup_s": row.get("startup_s"),
            "acceptance_rate": row.get("acceptance_rate"),
            "tokens_per_step": row.get("tokens_per_step"),
            "answers_exact": row.get("answers_exact"),
            "same_answers_as_first": answers == reference if answers else None,
            "error": row.get("error"),
        }
        for p in row.get("points", []):
            line[f"ext_s_c{p['concurrency']}"] = p["extractions_per_s"]
            line[f"tok_s_c{p['concurrency']}"] = p["output_tokens_per_s"]
            line[f"p50_c{p['concurrency']}"] = p["latency_p50_s"]
            line[f"steer_exact_c{p['concurrency']}"] = p["steer_exact"]
        summary.append(line)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint (or stand-in config) directory to serve")
    source.add_argument("--demo", action="store_true", help="serve the tiny demo model (CPU smoke run)")
    p.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME=ARGS")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256])
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--ramp", type=float, default=3.0)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument(
        "--steer", choices=list(STYLES), default="minimal", help="answer layout the grammar writes"
    )
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ready-timeout", type=float, default=1500.0)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.serve_args = serve_args
    args.api_key = None
    args.steer_from_prompt = True  # read by engines.Server: STEER_FROM_PROMPT=<steer> for the server
    if min(args.concurrency, default=0) < 1 or args.duration <= 0:
        p.error("--concurrency needs positive integers and --duration a positive number")
    if len({name for name, _, _ in args.variant}) != len(args.variant):
        p.error("variant names must differ")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "meta": {
            **run_meta(args),
            "steering": [*STEERING, f"{STEER_FROM_PROMPT_ENV}={args.steer}"],
            "variants": [{"name": n, "engines": e, "args": a} for n, e, a in args.variant],
        },
        "rows": [],
    }
    for name, engines, extra in args.variant:
        print(f"[spec] {name}: starting ({time.strftime('%H:%M:%S')})", flush=True)
        row = measure(args, name, engines, extra, work)
        payload["rows"].append(row)
        payload["summary"] = summarise(payload["rows"])
        write(args.out, payload)
        print(f"[spec] {name}: {row.get('error') or 'done'} {json.dumps(payload['summary'][-1])}", flush=True)
    failed = any("error" in r or r.get("throughput_exit_code") for r in payload["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Closed-loop throughput sweep against a running server: guided vs free decoding at equal length.

    python benchmarks/throughput.py --base-url http://127.0.0.1:8000/v1 \
        --concurrency 1,8,32,64,128,256 --label backend=xgrammar --label whitespace=compact \
        --out results.json --plot results.png

At each concurrency C, C workers send requests back to back (closed loop) until N = max(
--min-requests, --requests-per-worker x C) have finished, first guided (the endpoint schema as
``response_format``, what the server also injects by default), then free (``response_format`` text,
``ignore_eos``) with ``max_tokens`` equal to the guided run's mean output length, so both decode
the same number of tokens. ``--free-tokens N`` fixes the free length instead. With ``--duration
S`` each point instead runs until S seconds after a ``--ramp`` and its rates come from that steady
window (output tokens from the server's own counter), which keeps answers of unequal length from
leaving workers idle during the measurement; use it for guided-vs-free comparisons.

Reported per point: requests/s, output tokens/s, extractions/s (schema-valid guided answers per
second), tokens per extraction, latency p50/p99, time to first token p50/p99 (``--stream``), how
many answers hit ``max_tokens``, and the client's own CPU time (near the wall time means the client,
not the server, was the limit).

Backend and whitespace are server settings (``python -m serve --structured-backend guidance
--any-whitespace``): give them as ``--label`` so each result file says what it measured; a sweep over
server configurations is a shell loop (BENCHMARKS.md).

``--steer spaced|minimal|pretty`` (benchmark stand-in only) asks a random-weight server started with
``--logits-processors benchmarks.steer:SteerToText`` to produce the gold answer for each text, so
outputs have the real model's shape and length; it draws texts from the gold set. It asks through
``vllm_xargs``, which the schema policy refuses on guided requests; ``--steer-from-prompt`` sends
none, for a server started with ``STEER_FROM_PROMPT=STYLE`` (``steer.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.workload import CORPUS, GOLD, STYLES, Item, load  # noqa: E402
from client.models import EndpointExtraction, endpoint_json_schema  # noqa: E402
from client.prompt import build_messages  # noqa: E402

GUIDED_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "EndpointExtraction", "schema": endpoint_json_schema(), "strict": True},
}


@dataclass
class Outcome:
    ok: bool
    latency: float
    ttft: float | None = None
    tokens: int = 0
    finish: str | None = None
    text: str = ""
    error: str | None = None


@dataclass
class Point:
    mode: str
    concurrency: int
    requests: int
    max_tokens: int
    ok: int = 0
    errors: int = 0
    valid: int = 0
    steer_exact: int | None = None
    hit_max_tokens: int = 0
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    extractions_per_s: float | None = None
    mean_output_tokens: float = 0.0
    tokens_per_extraction: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    first_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def request_body(args: argparse.Namespace, item: Item, guided: bool, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "messages": build_messages(item.text),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "response_format": GUIDED_FORMAT if guided else {"type": "text"},
    }
    if not guided:
        body["ignore_eos"] = True
    if args.steer != "none" and not args.steer_from_prompt:
        body["vllm_xargs"] = {"steer_text": target_text(args.steer, item)}
    if args.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def target_text(style: str, item: Item) -> str:
    assert item.expected is not None
    return STYLES[style](item.expected)


async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
    start = time.perf_counter()
    try:
        if not body.get("stream"):
            response = await client.post("/chat/completions", json=body)
            if response.status_code != 200:
                return Outcome(
                    False, time.perf_counter() - start, error=f"{response.status_code} {response.text[:200]}"
                )
            reply = response.json()
            choice = reply["choices"][0]
            return Outcome(
                True,
                time.perf_counter() - start,
                tokens=int(reply["usage"]["completion_tokens"]),
                finish=choice.get("finish_reason"),
                text=choice["message"].get("content") or "",
            )
        ttft = None
        parts: list[str] = []
        tokens, finish = 0, None
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:200]
                return Outcome(False, time.perf_counter() - start, error=f"{response.status_code} {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices", ()):
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        parts.append(delta)
                    finish = choice.get("finish_reason") or finish
        return Outcome(True, time.perf_counter() - start, ttft, tokens, finish, "".join(parts))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(False, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}")


async def generated_tokens(client: httpx.AsyncClient, root: str) -> float | None:
    """vLLM's own count of generated tokens (Prometheus ``vllm:generation_tokens_total``)."""
    try:
        text = (await client.get(f"{root}/metrics")).text
    except httpx.HTTPError:
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    ]
    return sum(values) if values else None


def _valid(text: str) -> bool:
    try:
        EndpointExtraction.model_validate_json(text)
    except ValueError:
        return False
    return True


async def run_point(
    args: argparse.Namespace, items: list[Item], mode: str, concurrency: int, max_tokens: int
) -> Point:
    """One closed-loop point. With ``--duration`` the rates are those of a steady window in which
    all workers are busy: the first ``--ramp`` seconds and the drain after the window are left out,
    so answers of unequal length do not leave workers idle inside the measurement."""
    guided = mode == "guided"
    steady = args.duration > 0
    n = 0 if steady else max(args.min_requests, args.requests_per_worker * concurrency)
    point = Point(mode, concurrency, n, max_tokens)
    outcomes: list[tuple[Item, Outcome, float]] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    root = args.base_url.removesuffix("/").removesuffix("/v1")
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=args.timeout, limits=limits, headers=headers
    ) as client:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        window = (wall0 + args.ramp, wall0 + args.ramp + args.duration)
        counts: list[tuple[float, float | None]] = []

        def more() -> bool:
            return time.perf_counter() < window[1] if steady else next_index < n

        async def worker() -> None:
            nonlocal next_index
            while more():
                # Texts rotate with an offset per concurrency level so prefix-cache hits on whole
                # prompts stay rare; the shared system prompt is cached, as in production.
                item = items[(next_index + 7 * concurrency) % len(items)]
                next_index += 1
                outcome = await send(client, request_body(args, item, guided, max_tokens))
                outcomes.append((item, outcome, time.perf_counter()))

        async def sample_counts() -> None:
            for at in window:
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                counts.append((time.perf_counter(), await generated_tokens(client, root)))

        tasks = [worker() for _ in range(concurrency)] + ([sample_counts()] if steady else [])
        await asyncio.wait_for(asyncio.gather(*tasks), args.point_timeout)
        point.wall_s = time.perf_counter() - wall0
        point.client_cpu_s = time.process_time() - cpu0

    point.requests = len(outcomes)
    good = [(item, o, end) for item, o, end in outcomes if o.ok]
    point.ok, point.errors = len(good), len(outcomes) - len(good)
    point.first_error = next((o.error for _, o, _ in outcomes if not o.ok), None)
    point.hit_max_tokens = sum(o.finish == "length" for _, o, _ in good)
    point.mean_output_tokens = statistics.fmean(o.tokens for _, o, _ in good) if good else 0.0
    valid = {id(o) for _, o, _ in good if guided and _valid(o.text)}
    if steady:
        span = args.duration
        counted = [(item, o) for item, o, end in good if window[0] <= end <= window[1]]
        (t0, c0), (t1, c1) = counts
        if c0 is not None and c1 is not None:
            point.output_tokens_per_s = (c1 - c0) / (t1 - t0)
            point.extra["tokens_per_s_from"] = "server counter vllm:generation_tokens_total"
        else:
            point.output_tokens_per_s = sum(o.tokens for _, o in counted) / span
            point.extra["tokens_per_s_from"] = "answers completed in the window"
        point.extra["window_s"] = [args.ramp, args.ramp + args.duration]
    else:
        span = point.wall_s
        counted = [(item, o) for item, o, _ in good]
        point.output_tokens_per_s = sum(o.tokens for _, o in counted) / span
    point.requests_per_s = len(counted) / span
    point.latency_p50_s = percentile([o.latency for _, o in counted], 0.50)
    point.latency_p99_s = percentile([o.latency for _, o in counted], 0.99)
    ttfts = [o.ttft for _, o in counted if o.ttft is not None]
    point.ttft_p50_s, point.ttft_p99_s = percentile(ttfts, 0.50), percentile(ttfts, 0.99)
    if guided:
        if args.steer != "none":
            point.steer_exact = sum(o.text == target_text(args.steer, item) for item, o, _ in good)
        point.valid = len(valid)
        point.extractions_per_s = sum(id(o) in valid for _, o in counted) / span
        valid_tokens = [o.tokens for _, o, _ in good if id(o) in valid]
        point.tokens_per_extraction = statistics.fmean(valid_tokens) if valid_tokens else None
    return point


def server_info(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {}
    root = args.base_url.removesuffix("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"}
    for key, url in (("version", f"{root}/version"), ("models", f"{args.base_url}/models")):
        try:
            info[key] = httpx.get(url, headers=headers, timeout=10).json()
        except (httpx.HTTPError, ValueError) as exc:
            info[key] = f"unavailable: {exc}"
    return info


def describe(point: Point) -> str:
    ext = f"{point.extractions_per_s:8.2f}" if point.extractions_per_s is not None else "       -"
    valid = f"{point.valid:<5}" if point.mode == "guided" else "-    "
    ttft = f"{point.ttft_p50_s:6.3f}" if point.ttft_p50_s is not None else "     -"
    return (
        f"{point.mode:6} c={point.concurrency:<4} n={point.requests:<5} ok={point.ok:<5} "
        f"valid={valid} len={point.mean_output_tokens:7.1f} hit_max={point.hit_max_tokens:<4} "
        f"req/s={point.requests_per_s:8.2f} tok/s={point.output_tokens_per_s:9.1f} ext/s={ext} "
        f"p50={point.latency_p50_s or 0:6.3f} p99={point.latency_p99_s or 0:6.3f} ttft50={ttft} "
        f"cpu/wall={point.client_cpu_s / point.wall_s:4.2f}"
    )


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    items = load(GOLD if args.steer != "none" else args.texts)
    if args.steer != "none" and any(i.expected is None for i in items):
        raise SystemExit("--steer needs a workload file with expected answers")
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url,
        "model": args.model,
        "labels": dict(args.label),
        "server": server_info(args),
        "client_host": platform.node(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if all(str(v).startswith("unavailable") for v in meta["server"].values()):  # type: ignore[union-attr]
        raise SystemExit(f"throughput: error: no server answers at {args.base_url}")
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "duration": 0.0, "min_requests": args.warmup})
        await run_point(warm, items, "guided", min(8, args.warmup), 64)
    points: list[Point] = []
    for concurrency in args.concurrency:
        guided_len: float | None = None
        for mode in args.modes:
            if mode == "guided":
                max_tokens = args.max_tokens
            elif args.free_tokens is not None:
                max_tokens = args.free_tokens
            else:
                max_tokens = max(1, round(guided_len)) if guided_len else args.max_tokens
            point = await run_point(args, items, mode, concurrency, max_tokens)
            if mode == "guided":
                guided_len = point.mean_output_tokens
            points.append(point)
            print(describe(point), flush=True)
    for point in points:
        if point.mode == "guided":
            free = next((p for p in points if p.mode == "free" and p.concurrency == point.concurrency), None)
            if free and free.output_tokens_per_s:
                point.extra["guided_over_free_tok_s"] = round(
                    point.output_tokens_per_s / free.output_tokens_per_s, 3
                )
    return {"meta": meta, "points": [asdict(p) for p in points]}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("guided", "o-"), ("free", "s--")):
        pts = [p for p in results["points"] if p["mode"] == mode]
        if not pts:
            continue
        conc = [p["concurrency"] for p in pts]
        ax_tput.plot(conc, [p["output_tokens_per_s"] for p in pts], style, label=f"{mode} output tok/s")
        ax_lat.plot(conc, [p["latency_p50_s"] or 0 for p in pts], style, label=f"{mode} p50")
        ax_lat.plot(conc, [p["latency_p99_s"] or 0 for p in pts], style, alpha=0.45, label=f"{mode} p99")
    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_tput.set_ylabel("output tokens / s")
    ax_lat.set_ylabel("request latency (s)")
    labels = ", ".join(f"{k}={v}" for k, v in results["meta"]["labels"].items())
    fig.suptitle(textwrap.fill(f"{results['meta']['model']}: {labels}", 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label must be KEY=VALUE, not {value!r}")
    return key, val


def _ints(value: str) -> list[int]:
    try:
        numbers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return numbers


def _modes(value: str) -> list[str]:
    modes = [m.strip() for m in value.split(",") if m.strip()]
    if not modes or set(modes) - {"guided", "free"}:
        raise argparse.ArgumentTypeError("modes are guided and/or free")
    return sorted(modes, key=["guided", "free"].index)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="endpoint-extractor")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--modes", type=_modes, default=["guided", "free"])
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="steady-state mode: measure a window of this many seconds with every worker busy "
        "(default 0: a fixed number of requests per point, drain included)",
    )
    p.add_argument("--ramp", type=float, default=3.0, help="seconds left out before the window")
    p.add_argument("--requests-per-worker", type=int, default=3)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512, help="guided max_tokens")
    p.add_argument("--free-tokens", type=int, default=None, help="free max_tokens (default: guided mean)")
    p.add_argument("--texts", type=Path, default=CORPUS, help="JSONL of {id, text} (default: the corpus)")
    p.add_argument(
        "--steer",
        choices=["none", *STYLES],
        default="none",
        help="steer a random-weight server to the gold answers in this JSON style (xgrammar "
        "without whitespace: spaced; guidance without whitespace: minimal; free whitespace: pretty)",
    )
    p.add_argument(
        "--steer-from-prompt",
        action="store_true",
        help="with --steer: send no vllm_xargs, the server steers by prompt (STEER_FROM_PROMPT=STYLE "
        "in its environment), so requests pass the product's schema policy unchanged",
    )
    p.add_argument("--stream", action="store_true", help="stream, to measure time to first token")
    p.add_argument("--warmup", type=int, default=8, help="warm-up requests before the sweep (0: none)")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--point-timeout", type=float, default=1800.0, help="per sweep point, seconds")
    p.add_argument("--label", type=_label, action="append", default=[], help="KEY=VALUE to record")
    p.add_argument("--out", type=Path, help="write results as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of throughput and latency here")
    p.add_argument("--replot", type=Path, help="plot this earlier results JSON instead of measuring")
    args = p.parse_args(argv)
    if args.requests_per_worker < 1 or args.min_requests < 1 or args.max_tokens < 1:
        p.error("--requests-per-worker, --min-requests and --max-tokens must be positive")
    if args.duration < 0 or args.ramp < 0:
        p.error("--duration and --ramp cannot be negative")
    if args.steer_from_prompt and args.steer == "none":
        p.error("--steer-from-prompt needs --steer STYLE (the style the server steers to)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        if not args.plot:
            print("throughput: error: --replot needs --plot", file=sys.stderr)
            return 2
        try:
            results = json.loads(args.replot.read_text())
        except (OSError, ValueError) as exc:
            print(f"throughput: error: cannot read {args.replot}: {exc}", file=sys.stderr)
            return 1
        plot(results, args.plot)
        return 0
    try:
        results = asyncio.run(sweep(args))
    except TimeoutError:
        print(
            f"throughput: error: a sweep point ran past --point-timeout {args.point_timeout}s",
            file=sys.stderr,
        )
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(args.out)
    if args.plot:
        plot(results, args.plot)
    failed = sum(p["errors"] for p in results["points"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

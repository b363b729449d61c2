"""Two real vLLM servers behind one client: a bulk job is spread over both, one server is killed
with SIGKILL (its whole process group) mid-job, and the job still ends with every id once, ok."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve.launcher import ServerProcess, prepare_model
from serve.settings import ServeSettings
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "corpus.jsonl"
CONCURRENCY = 8


@pytest.fixture(scope="module")
def pair(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    logs = tmp_path_factory.mktemp("pair")
    ports = [free_port()]
    while len(ports) < 2:
        ports += [port for port in [free_port()] if port not in ports]
    servers = [
        ServerProcess(ServeSettings(demo=True, demo_dir=demo_dir, port=port), log_path=logs / f"{port}.log")
        for port in ports
    ]
    prepare_model(servers[0].settings)  # merge once here, rather than twice at once in the servers
    try:
        for server in servers:  # both load at the same time
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.root_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def in_flight(server: ServerProcess) -> float:
    return metric(server, "vllm:num_requests_running") + metric(server, "vllm:num_requests_waiting")


def test_job_over_two_servers_survives_one_killed(pair: list[ServerProcess], tmp_path: Path) -> None:
    survivor, victim = pair
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    ids = [row["id"] for row in rows]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": row["id"], "text": row["text"]}) + "\n" for row in rows))
    urls = [arg for server in pair for arg in ("--base-url", server.base_url)]
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "client",
            *urls,
            "batch",
            str(source),
            str(out),
            "--concurrency",
            str(CONCURRENCY),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Kill once both servers have answered and the victim has requests in flight.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and len(out.read_bytes().splitlines()) >= 20:
                served = [metric(server, "vllm:request_success_total") for server in pair]
                if min(served) > 0 and in_flight(victim) > 0:
                    break
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before the kill"
        survivor_before = metric(survivor, "vllm:request_success_total")
        done_at_kill = len(out.read_bytes().splitlines())
        assert min(survivor_before, metric(victim, "vllm:request_success_total")) > 0, "load not spread"
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=60)
        _, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    assert job.returncode == 0, stderr
    assert done_at_kill < len(ids)
    lines = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert Counter(line["id"] for line in lines) == Counter(ids)  # every id exactly once
    assert all(line["ok"] for line in lines), [line["error"] for line in lines if not line["ok"]][:3]
    assert f"batch complete: {len(ids)} ok, 0 failed" in stderr
    # The rest of the job, the victim's in-flight requests included, went to the survivor (less
    # the victim's answers that arrived between counting the lines and the kill: at most CONCURRENCY).
    after = metric(survivor, "vllm:request_success_total") - survivor_before
    assert after >= len(ids) - done_at_kill - CONCURRENCY
    with pytest.raises(httpx.ConnectError):
        httpx.get(victim.root_url + "/health", timeout=5)

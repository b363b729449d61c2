"""Faults on a real vLLM CPU server: kill -9 it twice during a bulk job of 520 records and restart
it. Each time the job stops by itself (exit 75: no server), is started again with the same command,
and goes on; at the end OUTPUT holds every input id exactly once, all extracted. Meanwhile a client
call made while the server is down rides out the restart. (SIGTERM draining: test_serve_ops.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from client import EndpointClient, EndpointExtraction
from serve.launcher import ServerProcess
from serve.settings import ServeSettings
from serve.supervisor import probe
from tests.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "corpus.jsonl"
RECORDS = 520
# OUTPUT lines at which the server is killed.
KILL_AT = (100, 300)
TEXT = "Overall survival | [Time Frame: up to 5 years]"


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_9(server: ServerProcess) -> None:
    """SIGKILL the whole server, vLLM's API server and engine processes included, as a crash would."""
    assert server.process is not None
    family = [
        psutil.Process(server.process.pid),
        *psutil.Process(server.process.pid).children(recursive=True),
    ]
    for proc in family:
        proc.kill()
    psutil.wait_procs(family, timeout=60)
    server.stop()  # reaps it and closes its log


def start_job(server: ServerProcess, src: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "client", "--base-url", server.base_url, "batch", str(src), str(out)]
    with log.open("ab") as err:
        return subprocess.Popen([*argv, "--concurrency", "8", "--no-progress"], stdout=err, stderr=err)


@pytest.mark.timeout(2400)  # three start-ups of vLLM on 2 cores and 520 extractions
def test_kill_9_twice_during_a_bulk_job_loses_and_duplicates_nothing(demo_dir: Path, tmp_path: Path) -> None:
    corpus = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    src, out, job_log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "job.log"
    ids = [f"r{i:04d}" for i in range(RECORDS)]
    src.write_text(
        "".join(
            json.dumps({"id": i, "text": corpus[n % len(corpus)]["text"]}) + "\n" for n, i in enumerate(ids)
        )
    )
    settings = ServeSettings(demo=True, demo_dir=demo_dir, port=free_port())
    server = ServerProcess(settings, log_path=tmp_path / "serve.log")
    url = server.base_url  # the same for every restart
    rider: dict[str, Any] = {}

    def ride_out() -> None:
        started = time.monotonic()
        # Bounded backoff (at most 20 s between attempts); enough attempts to outlast a restart.
        with EndpointClient(url, max_retries=60) as client:
            rider["value"] = client.extract(TEXT)
        rider["waited"] = time.monotonic() - started

    try:
        server.start()
        server.wait_ready()
        for round_, kill_at in enumerate(KILL_AT):
            job = start_job(server, src, out, job_log)
            deadline = time.monotonic() + 900
            while count_lines(out) < kill_at and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job.poll() is None, job_log.read_text()[-3000:]
            assert count_lines(out) >= kill_at, "the job made too little progress"
            kill_9(server)
            assert job.wait(timeout=300) == 75, job_log.read_text()[-3000:]
            assert "run the same command again to go on" in job_log.read_text()
            if round_ == 0:
                assert probe(server.root_url + "/health") is None  # connection refused
                thread = threading.Thread(target=ride_out)
                thread.start()
            server = ServerProcess(settings, log_path=tmp_path / "serve.log")
            server.start()
            server.wait_ready()
        final = start_job(server, src, out, job_log)
        assert final.wait(timeout=1200) == 0, job_log.read_text()[-3000:]
        thread.join(timeout=300)
    finally:
        server.stop()
    lines = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert Counter(line["id"] for line in lines) == Counter(ids)  # none lost, none twice
    assert all(line["ok"] for line in lines)
    for line in lines[:: len(lines) // 20]:
        EndpointExtraction.model_validate(line["extraction"])
    assert isinstance(rider.get("value"), EndpointExtraction), rider
    assert rider["waited"] > 1.0  # it did wait for the restart

"""`python -m serve` as a user runs it: every start-up failure ends with one `serve: error:` line
and a non-zero exit code, never a traceback or a hang."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str, timeout: float = 60) -> tuple[int, list[str]]:
    """Exit code and stderr lines other than the settings echo."""
    code, lines, _ = serve_with_pid(*args, timeout=timeout)
    return code, lines


def serve_with_pid(*args: str, timeout: float) -> tuple[int, list[str], int]:
    with subprocess.Popen(
        [sys.executable, "-m", "serve", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    lines = [line for line in stderr.splitlines() if not line.startswith("serve: settings ")]
    return process.returncode, lines, process.pid


def processes_started_by(supervisor_pid: int) -> list[int]:
    """vLLM's processes (API server, engine core, worker) inherit the supervisor's drain-flag path,
    which names the supervisor's pid; engine processes retitle themselves, so argv would not do."""
    flag = f"endpoint-serve-{supervisor_pid}.draining"
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("ENDPOINT_DRAIN_FLAG", "").endswith(flag):
                found.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def unknown_model(tmp_path: Path) -> Path:
    """A directory that looks like a checkpoint to us and that vLLM refuses to load."""
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["NoSuchModel"], "model_type": "nosuch"})
    )
    return tmp_path


def test_non_loopback_bind_without_a_key_refuses_to_start() -> None:
    code, lines = serve("--demo", "--host", "0.0.0.0")
    assert code != 0
    assert lines == [
        "serve: error: refusing to bind 0.0.0.0 (beyond loopback) without --api-key; "
        "pass --allow-unauthenticated to do it anyway"
    ]


def test_bad_model_directories(tmp_path: Path) -> None:
    code, lines = serve("--model", str(tmp_path / "missing"))
    assert code == 1 and lines == [f"serve: error: model directory {tmp_path / 'missing'} does not exist"]
    code, lines = serve("--model", str(tmp_path))
    assert code == 1 and len(lines) == 1 and "has no config.json" in lines[0]


def test_port_in_use(unknown_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = serve("--model", str(unknown_model), "--port", str(port))
    assert code == 1 and lines == [f"serve: error: cannot bind 127.0.0.1:{port}: Address already in use"]


def test_kv_cache_larger_than_memory(unknown_model: Path) -> None:
    code, lines = serve(
        "--model", str(unknown_model), "--port", str(free_port()), "--cpu-kvcache-gib", "100000"
    )
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("serve: error: a 100000 GiB KV cache (VLLM_CPU_KVCACHE_SPACE) does not fit")


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("model", "extra", "cause"),
    [
        ("unknown", [], "model type `nosuch` but Transformers does not recognize this architecture"),
        (
            "demo",
            ["--gpu-memory-utilization", "1.5"],
            "gpu_memory_utilization Input should be less than or equal to 1",
        ),
    ],
    ids=["unknown-architecture", "impossible-memory-share"],
)
def test_vllm_dying_during_start_up_is_summarised_in_one_line(
    unknown_model: Path, demo_dir: Path, model: str, extra: list[str], cause: str
) -> None:
    which = ["--model", str(unknown_model)] if model == "unknown" else ["--demo", "--demo-dir", str(demo_dir)]
    code, lines = serve(*which, "--port", str(free_port()), *extra, timeout=300)
    errors = [line for line in lines if line.startswith("serve: error:")]
    assert code == 1 and len(errors) == 1 and lines[-1] == errors[0]
    assert errors[0].startswith("serve: error: vLLM exited with code 1 during start-up: ValidationError: ")
    assert cause in errors[0]


@pytest.mark.e2e
def test_start_up_that_outlasts_its_deadline_is_stopped(demo_dir: Path) -> None:
    port = free_port()
    started = time.monotonic()
    code, lines, pid = serve_with_pid(
        "--demo", "--demo-dir", str(demo_dir), "--port", str(port), "--startup-timeout", "3", timeout=300
    )
    assert code == 1
    assert lines[-1] == "serve: error: vLLM was not ready after 3s; stopped it (--startup-timeout)"
    assert time.monotonic() - started < 240
    assert processes_started_by(pid) == []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # the port is free again

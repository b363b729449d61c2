"""scripts/gpu-smoke.sh's argument handling (the GPU run itself is in BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-smoke.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)


def test_dry_run_names_the_interpreter_the_logs_and_the_full_demo(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    result = _run("--dry-run", "--python", sys.executable, "--log-dir", str(logs), "--port", "8123",
                  "--concurrency", "256", "--duration", "10")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["python"] == sys.executable and lines["logs"] == str(logs) and logs.is_dir()
    assert "-m serve --demo --demo-dir" in lines["serve"] and "--port 8123" in lines["serve"]
    assert lines["serve"].endswith("--attention-backend TRITON_ATTN")  # the default on a GPU
    assert "--base-url http://127.0.0.1:8123/v1 extract" in lines["extract"]
    assert (
        "--concurrency 256 --modes guided" in lines["throughput"] and "--duration 10 " in lines["throughput"]
    )


def test_serve_args_after_the_separator_replace_the_default(tmp_path: Path) -> None:
    result = _run("--dry-run", "--python", sys.executable, "--log-dir", str(tmp_path), "--",
                  "--max-num-seqs", "128", "--gpu-memory-utilization", "0.5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    serve = next(line for line in result.stdout.splitlines() if line.startswith("serve:"))
    assert serve.endswith("--max-num-seqs 128 --gpu-memory-utilization 0.5") and "TRITON_ATTN" not in serve


def test_python_from_the_environment(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "PYTHON": sys.executable}
    result = _run("--dry-run", "--log-dir", str(tmp_path), env=env)
    assert result.returncode == 0 and f"python: {sys.executable}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port expects a whole number >= 1, got '0'"),
        (["--port", "70000"], "--port must be at most 65535"),
        (["--duration", "3.5"], "--duration expects a whole number >= 1"),
        (["--concurrency", "-4"], "--concurrency expects a whole number >= 1"),
        (["--concurrency"], "--concurrency needs a value"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--log-dir", "/proc/gpu-smoke"], "is not writable"),
    ],
)
def test_bad_arguments_are_one_line_errors_with_status_2(args: list[str], message: str) -> None:
    result = _run("--dry-run", "--python", sys.executable, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_a_missing_interpreter_fails_in_one_line(tmp_path: Path) -> None:
    result = _run("--python", str(tmp_path / "no-python"), "--log-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"gpu-smoke: FAIL no Python interpreter '{tmp_path / 'no-python'}' (give --python PATH); logs: {tmp_path}"
    ]


def test_without_a_gpu_it_fails_unless_told_to_run_on_the_cpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = _run("--python", sys.executable, "--log-dir", str(tmp_path))
    assert result.returncode == 1 and "FAIL torch sees no CUDA GPU" in result.stdout
    assert (tmp_path / "env.txt").read_text().startswith("python ")

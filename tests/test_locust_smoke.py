"""CI smoke run of the locust load test against the real vLLM CPU server on the tiny model: it must
run headless, stream, validate every answer against the schema and finish with zero failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_locust_headless_smoke_run_has_no_failures(server, tmp_path: Path) -> None:
    host = server.base_url.removesuffix("/v1")
    prefix = tmp_path / "smoke"
    proc = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks" / "locustfile.py"),
            "--host", host, "--headless", "-u", "2", "-r", "2", "-t", "20s",
            "--stream", "--max-tokens", "512", "--max-fail-ratio", "0",
            "--csv", str(prefix), "--html", str(tmp_path / "smoke.html"), "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "smoke_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0
    extracted = rows[("POST", "extract (stream)")]
    assert int(extracted["Request Count"]) > 0
    # Time to first token and inter-token latency are their own request types.
    assert int(rows[("TTFT", "extract (stream)")]["Request Count"]) >= int(extracted["Request Count"])
    assert int(rows[("ITL", "extract (stream)")]["Request Count"]) > 0
    assert (tmp_path / "smoke.html").stat().st_size > 0

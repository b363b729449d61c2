"""The CI variant of the soak (benchmarks/soak.py; the 10-minute run is in BENCHMARKS.md): locust at
saturation against the real vLLM CPU server (two minutes of warm-up, one measured), zero failed or
schema-invalid answers, memory flat on both sides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def test_short_soak_has_no_failures_and_flat_memory(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable, "benchmarks/soak.py", "--host", server.root_url,
            "--server-pid", str(server.process.pid), "--users", "16", "--warmup", "120s",
            "--duration", "60s", "--interval", "1", "--out", str(out), "--csv-prefix", str(tmp_path / "soak"),
        ],
        capture_output=True,
        text=True,
        timeout=500,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] > 0 and report["failures"] == 0
    assert report["server"]["flat"] and report["client"]["flat"]
    assert report["samples"] >= 40

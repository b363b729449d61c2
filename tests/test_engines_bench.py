"""benchmarks/engines.py, the GPU driver for several engines: its configs and summary without a
server, and (slow) one end-to-end run on the tiny CPU model with tiny durations, so the GPU run
does not find its bugs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.engines import Config, Server, parse_args, parse_configs, summarise, throughput_argv
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_configs_name_engines_and_variants() -> None:
    assert parse_configs("1,2,4:mps=off,4:pin=off:mps=off") == [
        Config(1),
        Config(2),
        Config(4, mps="off"),
        Config(4, mps="off", pin="off"),
    ]
    assert [c.label for c in parse_configs("1,4:mps=off,4:pin=off")] == ["1", "4-mps-off", "4-pin-off"]
    for bad in ("", "0", "x", "2:mps", "2:gpu=1", "2:pin=maybe"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_configs(bad)


def test_serve_and_throughput_commands(tmp_path: Path) -> None:
    args = parse_args(
        ["--model", "/m", "--configs", "4:mps=off", "--concurrency", "64,256", "--out", str(tmp_path / "r.json"),
         "--", "--load-format", "dummy"]
    )  # fmt: skip
    config = args.configs[0]
    server = Server(args, config, tmp_path / "log")
    assert server.argv[3:] == [
        "--model", "/m", "--port", "8000", "--engines", "4", "--mps", "off", "--pin-cores", "on",
        "--startup-timeout", "1500", "--load-format", "dummy",
    ]  # fmt: skip
    tp = throughput_argv(args, config, tmp_path / "o.json")
    assert tp[tp.index("--concurrency") + 1] == "64,256" and tp[tp.index("--steer") + 1] == "spaced"
    assert "engines=4" in tp and "mps=off" in tp


def test_summary_compares_with_one_engine_and_with_free() -> None:
    def point(mode: str, c: int, tok: float, ext: float | None) -> dict[str, object]:
        return {
            "mode": mode, "concurrency": c, "output_tokens_per_s": tok, "extractions_per_s": ext,
            "tokens_per_extraction": 111.5 if ext else None, "latency_p50_s": 1.0, "latency_p99_s": 2.0,
            "extra": {"tokens_per_s_from": "x"},
        }  # fmt: skip

    rows = [
        {"config": "1", "points": [point("guided", 256, 6000, 50), point("free", 256, 8000, None)]},
        {"config": "4", "points": [point("guided", 256, 15000, 140), point("free", 256, 15000, None)]},
    ]
    summary = summarise(rows)
    assert [(s["config"], s["x_one_engine"], s["guided_over_free"]) for s in summary] == [
        ("1", 1.0, 0.75),
        ("4", 2.8, 1.0),
    ]


@pytest.mark.e2e
@pytest.mark.slow
def test_the_driver_runs_end_to_end_on_the_cpu_demo(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "engines.py"), "--demo", "--configs", "2",
        "--concurrency", "2", "--duration", "2", "--ramp", "1", "--warmup", "1", "--steer", "none",
        "--max-tokens", "512", "--port", str(free_port()), "--out", str(out), "--", "--demo-dir", str(demo_dir),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["engines"] == 2 and row["stop_exit_code"] == 0 and row["startup_s"] > 0
    assert {(p["mode"], p["concurrency"]) for p in row["points"]} == {("guided", 2), ("free", 2)}
    guided = next(p for p in row["points"] if p["mode"] == "guided")
    assert guided["errors"] == 0 and guided["valid"] >= 1 and guided["tokens_per_extraction"]
    assert len(row["requests_per_engine"]) == 2 and sum(row["requests_per_engine"]) >= 2
    (line,) = result["summary"]
    assert line["config"] == "2" and line["extractions_per_s"] > 0

"""Run a benchmark campaign on a GPU machine within a time budget: start each server configuration
with ``python -m serve``, run throughput.py sweeps against it (optionally with py-spy recording the
engine process), run other commands, and keep every log and result under one directory.

    python benchmarks/gpu/campaign.py PLAN.json --work /tmp/campaign --deadline-s 560 \
        [--tar OUT/campaign.tar.gz]

PLAN.json is a list of steps, run in order:

    {"name": "nvsmi", "cmd": ["nvidia-smi"], "timeout": 30}
    {"name": "xgr", "server": {"model": DIR, "structured_backend": "xgrammar"},
     "vllm_args": ["--load-format", "dummy"], "ready_timeout": 400,
     "benches": [{"name": "steered", "args": ["--steer", "spaced"], "pyspy": {"at": "guided c=64"}}]}

The plans behind BENCHMARKS.md are in ``benchmarks/results/2026-11-25-h100/plan_*.json``.
A step is skipped when the time left is below its ``min_s``; each subprocess is killed at the
deadline. With ``--tar`` the work directory is archived after every step, so a run cut short still
returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(msg: str) -> None:
    print(f"[campaign {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], out: Path, timeout: float, env: dict[str, str] | None = None) -> int | None:
    with out.open("ab") as f:
        try:
            return subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, timeout), env=env, cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[campaign] killed after {timeout:.0f}s\n".encode())
            return None


def engine_pid(server_pid: int) -> int | None:
    import psutil

    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                return child.pid
        except psutil.Error:
            continue
    return None


def bench(
    step: dict[str, Any], spec: dict[str, Any], base_url: str, work: Path, budget: Budget, server_pid: int
) -> None:
    name = f"{step['name']}.{spec['name']}"
    args = [
        sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
        "--base-url", base_url,
        "--out", str(work / f"{name}.json"),
        "--plot", str(work / f"{name}.png"),
        *[f"--label={k}={v}" for k, v in step.get("labels", {}).items()],
        *spec.get("args", []),
    ]  # fmt: skip
    timeout = min(spec.get("timeout", 600), budget.left() - 10)
    if timeout < spec.get("min_s", 20):
        log(f"skip {name}: {budget.left():.0f}s left")
        return
    log(f"bench {name}: {' '.join(args[2:])}")
    pyspy = spec.get("pyspy")
    if not pyspy:
        rc = run_cmd(args, work / f"{name}.log", timeout)
        log(f"bench {name} rc={rc}")
        _tail(work / f"{name}.log")
        return
    # py-spy records the engine process while a dedicated single-point run is under way.
    with (work / f"{name}.log").open("ab") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        time.sleep(pyspy.get("delay", 6))
        pid = engine_pid(server_pid)
        if pid is None:
            log("py-spy: no EngineCore process found")
        else:
            spy = [
                "py-spy", "record", "--pid", str(pid), "--duration", str(pyspy.get("duration", 8)),
                "--rate", "200", "--format", "raw", "--threads", "--idle", "--nonblocking",
                "--output", str(work / f"{name}.pyspy.txt"),
            ]  # fmt: skip
            run_cmd(spy, work / f"{name}.pyspy.log", pyspy.get("duration", 8) + 30)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log(f"bench {name} rc={proc.returncode}")
    _tail(work / f"{name}.log")


def _tail(path: Path, lines: int = 14) -> None:
    if path.exists():
        for line in path.read_text(errors="replace").splitlines()[-lines:]:
            if line.startswith(("guided", "free ")) or "error" in line.lower():
                print("   " + line, flush=True)


def server_step(step: dict[str, Any], work: Path, budget: Budget, port: int) -> None:
    from serve.launcher import LaunchError, ServerProcess
    from serve.settings import ServeSettings

    settings = ServeSettings(port=port, **step["server"])
    ready = min(step.get("ready_timeout", 400), budget.left() - 20)
    if ready < 60:
        log(f"skip {step['name']}: {budget.left():.0f}s left")
        return
    server = ServerProcess(
        settings, step.get("vllm_args", []), log_path=work / f"{step['name']}.server.log", ready_timeout=ready
    )
    t0 = time.monotonic()
    try:
        server.start()
        server.wait_ready()
    except LaunchError as exc:
        log(f"{step['name']}: server failed: {exc}")
        server.stop()
        return
    log(f"{step['name']}: server ready in {time.monotonic() - t0:.0f}s")
    try:
        assert server.process is not None
        for spec in step.get("benches", []):
            bench(step, spec, server.base_url, work, budget, server.process.pid)
    finally:
        server.stop(timeout=30)


def archive(work: Path, tar: Path | None) -> None:
    if tar is None:
        return
    tmp = tar.with_name(tar.name + ".part")
    with tarfile.open(tmp, "w:gz") as t:
        t.add(work, arcname=work.name)
    os.replace(tmp, tar)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/campaign"))
    p.add_argument("--deadline-s", type=float, default=560)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tar", type=Path)
    args = p.parse_args()
    budget = Budget(args.deadline_s)
    args.work.mkdir(parents=True, exist_ok=True)
    plan = json.loads(args.plan.read_text())
    shutil.copy(args.plan, args.work / args.plan.name)
    for step in plan:
        if budget.left() < step.get("min_s", 30):
            log(f"skip {step['name']}: {budget.left():.0f}s left")
            continue
        t0 = time.monotonic()
        if "cmd" in step:
            rc = run_cmd(
                step["cmd"],
                args.work / f"{step['name']}.log",
                min(step.get("timeout", 300), budget.left() - 10),
                env={**os.environ, **step.get("env", {})},
            )
            log(f"{step['name']}: rc={rc} in {time.monotonic() - t0:.0f}s")
            if step.get("show"):
                for line in (
                    (args.work / f"{step['name']}.log")
                    .read_text(errors="replace")
                    .splitlines()[-step["show"] :]
                ):
                    print("   " + line, flush=True)
        else:
            server_step(step, args.work, budget, args.port)
            log(f"{step['name']}: done in {time.monotonic() - t0:.0f}s")
        archive(args.work, args.tar)
    log(f"campaign finished, {budget.left():.0f}s to spare")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several engines per GPU behind one endpoint: for each engine count (and MPS / pinning variant),
start ``python -m serve --engines N`` once, run ``throughput.py`` through its one URL over every
concurrency, guided and free, stop it, and write one JSON.

    # GPU (the kit's vLLM, the E4B stand-in with dummy weights, steered to the gold answers):
    python benchmarks/engines.py --model /tmp/standin --configs 1,2,4,4:mps=off \\
        --concurrency 64,256 --duration 12 --steer spaced --out $OUT/engines.json \\
        -- --load-format dummy --attention-backend TRITON_ATTN \\
           --logits-processors benchmarks.steer:SteerToText

    # CPU smoke run on the tiny demo model:
    python benchmarks/engines.py --demo --configs 1,2 --concurrency 1,2 --duration 2 --ramp 1 \\
        --steer none --max-tokens 64 --out /tmp/engines.json

A config is ``N`` or ``N:mps=off`` / ``N:pin=off`` (both may be given). Servers are started once per
config and reused for every concurrency and mode; the results file is rewritten after each config,
so a run cut short keeps what it measured. Everything after ``--`` goes to ``python -m serve`` (and
on to vLLM). Each row: output tokens/s, extractions/s, latency p50/p99 and tokens per extraction per
point (from throughput.py), the server's start-up time, and how many requests each engine answered
(its own ``vllm:request_success_total``), with the ratio of extractions/s to one engine's at the
same concurrency when the run has a 1-engine row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
STEER_FROM_PROMPT_ENV = "STEER_FROM_PROMPT"  # benchmarks/steer.py; not imported: it needs torch
POINT_KEYS = (
    "mode", "concurrency", "requests", "errors", "valid", "steer_exact", "output_tokens_per_s",
    "extractions_per_s", "requests_per_s", "latency_p50_s", "latency_p99_s", "tokens_per_extraction",
    "mean_output_tokens", "client_cpu_s", "wall_s",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    engines: int
    mps: str = "auto"
    pin: str = "on"

    @property
    def label(self) -> str:
        return (
            f"{self.engines}"
            + ("" if self.mps == "auto" else f"-mps-{self.mps}")
            + ("" if self.pin == "on" else "-pin-off")
        )


def parse_configs(text: str) -> list[Config]:
    configs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        count, *options = part.split(":")
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: a config starts with an engine count")
        values = {"mps": "auto", "pin": "on"}
        for option in options:
            key, sep, value = option.partition("=")
            allowed = {"mps": ("auto", "on", "off"), "pin": ("on", "off")}
            if not sep or key not in allowed or value not in allowed[key]:
                raise argparse.ArgumentTypeError(f"{part!r}: options are mps=auto|on|off and pin=on|off")
            values[key] = value
        configs.append(Config(int(count), values["mps"], values["pin"]))
    if not configs:
        raise argparse.ArgumentTypeError("give at least one config")
    return configs


def probe(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def engine_counts(root: str, engines: int) -> list[float | None]:
    """Each engine's own count of answered requests (``/engines/<i>/metrics``; one engine:
    ``/metrics``)."""
    counts: list[float | None] = []
    paths = ["/metrics"] if engines == 1 else [f"/engines/{i}/metrics" for i in range(engines)]
    for path in paths:
        try:
            with urllib.request.urlopen(root + path, timeout=30) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            counts.append(None)
            continue
        counts.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm:request_success_total{")
            )
        )
    return counts


class Server:
    """One ``python -m serve`` in its own session (so stopping it reaches every engine)."""

    def __init__(self, args: argparse.Namespace, config: Config, log: Path) -> None:
        source = ["--demo"] if args.demo else ["--model", args.model]
        self.argv = [
            sys.executable, "-m", "serve", *source,
            "--port", str(args.port),
            "--engines", str(config.engines),
            "--mps", config.mps,
            "--pin-cores", config.pin,
            "--startup-timeout", str(int(args.ready_timeout)),
            *args.serve_args,
        ]  # fmt: skip
        self.root = f"http://127.0.0.1:{args.port}"
        self.steer_from_prompt = args.steer if args.steer_from_prompt else None
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if self.steer_from_prompt:
            env[STEER_FROM_PROMPT_ENV] = self.steer_from_prompt
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while probe(self.root + "/health") != 200:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with code {self.process.returncode}: {self.last_line()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve was not ready after {timeout:.0f}s: {self.last_line()}")
            time.sleep(1.0)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def last_line(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        errors = [line for line in lines if line.startswith("serve: error")]
        return (errors or lines or ["no output"])[-1][:400]


def throughput_argv(args: argparse.Namespace, config: Config, out: Path) -> list[str]:
    argv = [
        sys.executable, str(THROUGHPUT),
        "--base-url", f"http://127.0.0.1:{args.port}/v1",
        "--concurrency", ",".join(map(str, args.concurrency)),
        "--modes", args.modes,
        "--duration", str(args.duration),
        "--ramp", str(args.ramp),
        "--steer", args.steer,
        "--max-tokens", str(args.max_tokens),
        "--warmup", str(args.warmup),
        "--label", f"engines={config.engines}",
        "--label", f"mps={config.mps}",
        "--label", f"pin_cores={config.pin}",
        "--out", str(out),
    ]  # fmt: skip
    if args.api_key:
        argv += ["--api-key", args.api_key]
    if args.steer_from_prompt:
        argv.append("--steer-from-prompt")
    return argv


def measure(args: argparse.Namespace, config: Config, work: Path) -> dict[str, Any]:
    row: dict[str, Any] = {
        "config": config.label,
        "engines": config.engines,
        "mps": config.mps,
        "pin_cores": config.pin,
    }
    server = Server(args, config, work / f"serve-{config.label}.log")
    started = time.monotonic()
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        row["startup_s"] = round(time.monotonic() - started, 1)
        log_lines = server.log.read_text(errors="replace").splitlines()
        row["placement"] = next((line for line in log_lines if " engines on 127.0.0.1:" in line), None)
        before = engine_counts(server.root, config.engines)
        out = work / f"throughput-{config.label}.json"
        with (work / f"throughput-{config.label}.log").open("wb") as sink:
            code = subprocess.run(
                throughput_argv(args, config, out), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
            ).returncode
        after = engine_counts(server.root, config.engines)
        row["requests_per_engine"] = [
            (a - b) if a is not None and b is not None else None for a, b in zip(after, before, strict=True)
        ]
        row["throughput_exit_code"] = code
        results = json.loads(out.read_text()) if out.exists() else {"points": []}
        row["points"] = [
            {k: p.get(k) for k in POINT_KEYS} | {"extra": p.get("extra", {})} for p in results["points"]
        ]
    except RuntimeError as exc:
        row["error"] = str(exc)
    finally:
        row["stop_exit_code"] = server.stop()
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config and concurrency: guided extractions/s, its ratio to one engine's, guided/free."""

    def point(row: dict[str, Any], mode: str, concurrency: int) -> dict[str, Any] | None:
        return next(
            (p for p in row.get("points", []) if (p["mode"], p["concurrency"]) == (mode, concurrency)), None
        )

    single = next((r for r in rows if r["config"] == "1"), None)
    summary = []
    for row in rows:
        for p in (p for p in row.get("points", []) if p["mode"] == "guided"):
            c = p["concurrency"]
            free = point(row, "free", c)
            base = point(single, "guided", c) if single else None
            summary.append({
                "config": row["config"],
                "concurrency": c,
                "guided_tok_s": p["output_tokens_per_s"],
                "free_tok_s": free["output_tokens_per_s"] if free else None,
                "guided_over_free": round(p["output_tokens_per_s"] / free["output_tokens_per_s"], 3)
                if free and free["output_tokens_per_s"] else None,
                "extractions_per_s": p["extractions_per_s"],
                "x_one_engine": round(p["extractions_per_s"] / base["extractions_per_s"], 2)
                if base and base["extractions_per_s"] else None,
                "tokens_per_extraction": p["tokens_per_extraction"],
                # throughput.py reads vLLM's token counter at /metrics; behind the balancer that is
                # per engine (/engines/<i>/metrics), so it counts the answers finished in the window.
                "tok_s_from": p["extra"].get("tokens_per_s_from"),
                "latency_p50_s": p["latency_p50_s"],
                "latency_p99_s": p["latency_p99_s"],
            })  # fmt: skip
    return summary


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint (or stand-in config) directory to serve")
    source.add_argument("--demo", action="store_true", help="serve the tiny demo model (CPU smoke run)")
    p.add_argument("--configs", type=parse_configs, default=parse_configs("1,2,4"))
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256])
    p.add_argument("--modes", default="guided,free")
    p.add_argument("--duration", type=float, default=12.0, help="steady window per point, seconds")
    p.add_argument("--ramp", type=float, default=3.0)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steer", default="spaced", help="throughput.py --steer (none on an unsteered server)")
    p.add_argument(
        "--steer-from-prompt",
        action="store_true",
        help="the server steers by prompt (STEER_FROM_PROMPT), so guided requests go through the "
        "schema policy as users' do; without it they carry vllm_xargs (needs --schema-policy off)",
    )
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="if serve_args set a key (ENDPOINT_API_KEY)")
    p.add_argument("--ready-timeout", type=float, default=1500.0, help="seconds for all engines to start")
    p.add_argument("--work", type=Path, default=None, help="logs and raw results (default: next to --out)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.serve_args = serve_args
    if min(args.concurrency, default=0) < 1 or args.duration <= 0:
        p.error("--concurrency needs positive integers and --duration a positive number")
    return args


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """When, where and on what a campaign ran: the head of every results file."""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cores": len(os.sched_getaffinity(0)),
        "model": "demo" if args.demo else args.model,
        "serve_args": args.serve_args,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "meta": {
            **run_meta(args),
            "args": {k: v for k, v in vars(args).items() if k not in ("configs", "work", "out")},
            "configs": [c.label for c in args.configs],
        },
        "rows": [],
    }
    for config in args.configs:
        print(f"[engines] {config.label}: starting ({time.strftime('%H:%M:%S')})", flush=True)
        row = measure(args, config, work)
        payload["rows"].append(row)
        payload["summary"] = summarise(payload["rows"])
        write(args.out, payload)
        print(
            f"[engines] {config.label}: {row.get('error') or 'done'} (start-up {row.get('startup_s')} s)",
            flush=True,
        )
    for line in payload["summary"]:
        print(json.dumps(line), flush=True)
    failed = any("error" in r or r.get("throughput_exit_code") for r in payload["rows"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

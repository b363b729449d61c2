"""Soak test: locust at saturation for a long time, with the server's and the load generator's
memory sampled throughout. Passes when no request failed (any non-2xx, or an answer that is not a
valid extraction: benchmarks/locustfile.py counts both) and neither side's memory grew.

    python -m serve --demo &                      # or any running server
    python benchmarks/soak.py --host http://127.0.0.1:8000 --users 32 --warmup 2m --duration 10m \
        --out benchmarks/results/soak-cpu.json

The server is found by the port it listens on (or give ``--server-pid``); its memory is the RSS of
that process and all its children (vLLM's API server and engine). The load runs ``--warmup`` and
then ``--duration``; memory is judged on the second part only, because a fresh server's engine
grows for a minute or two under a new load (allocator pools, kernels for each new batch shape)
and then stays put. Memory is flat when the median RSS of the last quarter of the measured part
exceeds the median of its first quarter by no more than ``--max-growth-mib``. Every request of both
parts counts for the failure gate. Exit status 0 only when the run passes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
MIB = 2**20


@dataclass
class Memory:
    start_mib: float  # median of the first quarter after the warm-up
    end_mib: float  # median of the last quarter
    peak_mib: float
    growth_mib: float
    flat: bool
    by_minute_mib: list[float]  # median of each minute of the measured part: the shape of any growth


@dataclass
class Report:
    date: str
    host: str
    users: int
    warmup_s: float
    duration_s: float
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server: Memory
    client: Memory
    samples: int  # measured, after the warm-up
    passed: bool
    machine: str


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 10m or 1h, got {text!r}")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2] or "s"]


def listening_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            # vLLM's API server listens; the process to watch is the top of its tree.
            proc = psutil.Process(conn.pid)
            while (parent := proc.parent()) is not None and "serve" in " ".join(parent.cmdline()):
                proc = parent
            return proc.pid
    raise SystemExit(f"soak: error: nothing of this user listens on port {port}; pass --server-pid")


def tree_rss(pid: int) -> float:
    """RSS of a process and its descendants, in bytes (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def after_warmup(
    samples: list[tuple[float, float]], warmup: float, duration: float
) -> list[tuple[float, float]]:
    """The samples of the measured part, leaving out those taken once a process was gone."""
    kept = [(t, rss) for t, rss in samples if warmup <= t <= warmup + duration and rss > 0]
    if not kept:
        raise SystemExit("soak: error: no memory sample after the warm-up; is --duration too short?")
    return kept


def memory(samples: list[tuple[float, float]], max_growth_mib: float) -> Memory:
    """``samples``: (seconds, bytes) over the measured part."""
    values = [rss for _, rss in samples]
    quarter = max(1, len(values) // 4)
    start = statistics.median(values[:quarter]) / MIB
    end = statistics.median(values[-quarter:]) / MIB
    minutes: dict[int, list[float]] = {}
    for t, rss in samples:
        minutes.setdefault(int((t - samples[0][0]) // 60), []).append(rss)
    return Memory(
        start_mib=round(start, 1),
        end_mib=round(end, 1),
        peak_mib=round(max(values) / MIB, 1),
        growth_mib=round(end - start, 1),
        flat=end - start <= max_growth_mib,
        by_minute_mib=[round(statistics.median(minutes[m]) / MIB, 1) for m in sorted(minutes)],
    )


def locust_totals(prefix: Path) -> tuple[int, int, float, float, float]:
    with prefix.with_name(prefix.name + "_stats.csv").open() as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    return (
        int(total["Request Count"]),
        int(total["Failure Count"]),
        float(total["Requests/s"]),
        float(total["50%"]),
        float(total["99%"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="server root URL (no /v1)")
    parser.add_argument("--server-pid", type=int, default=None, help="server process (default: by port)")
    parser.add_argument("--users", type=int, default=32, help="locust users, all sending back to back")
    parser.add_argument(
        "--warmup", type=parse_duration, default=parse_duration("2m"), help="load not judged for memory"
    )
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("10m"), help="e.g. 10m")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--max-growth-mib", type=float, default=64.0, help="largest growth counted as flat")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    parser.add_argument("--csv-prefix", type=Path, default=None, help="keep locust's CSV files here")
    args, locust_extra = parser.parse_known_args(argv)

    port = urlsplit(args.host).port or 80
    server_pid = args.server_pid or listening_pid(port)
    prefix = args.csv_prefix or Path(f"/tmp/soak-{int(time.time())}")
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", args.host, "--headless",
        "-u", str(args.users), "-r", str(args.users), "-t", f"{int(args.warmup + args.duration)}s",
        "--max-tokens", str(args.max_tokens), "--max-fail-ratio", "0",
        "--csv", str(prefix), "--only-summary", "--stop-timeout", "120", *locust_extra,
    ]  # fmt: skip
    # (seconds since the start, bytes); 0 bytes once a process is gone.
    server_rss: list[tuple[float, float]] = []
    client_rss: list[tuple[float, float]] = []
    started = time.monotonic()
    log = prefix.with_name(prefix.name + ".log")
    with log.open("w") as sink, subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=sink) as locust:
        while locust.poll() is None:
            time.sleep(args.interval)
            now = time.monotonic() - started
            server_rss.append((now, tree_rss(server_pid)))
            client_rss.append((now, tree_rss(locust.pid)))
    stderr = log.read_text(errors="replace")
    elapsed = time.monotonic() - started
    try:
        requests, failures, rps, p50, p99 = locust_totals(prefix)
    except (OSError, KeyError) as exc:
        print(stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"soak: error: locust wrote no statistics ({exc})") from None
    server_measured = after_warmup(server_rss, args.warmup, args.duration)
    server_mem = memory(server_measured, args.max_growth_mib)
    client_mem = memory(after_warmup(client_rss, args.warmup, args.duration), args.max_growth_mib)
    report = Report(
        date=dt.date.today().isoformat(),
        host=args.host,
        users=args.users,
        warmup_s=args.warmup,
        duration_s=round(elapsed - args.warmup, 1),
        requests=requests,
        failures=failures,
        requests_per_s=rps,
        p50_ms=p50,
        p99_ms=p99,
        server=server_mem,
        client=client_mem,
        samples=len(server_measured),
        passed=requests > 0 and failures == 0 and server_mem.flat and client_mem.flat,
        machine=f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
    )
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if failures:
        print(stderr[-3000:], file=sys.stderr)
    print(
        f"soak {'passed' if report.passed else 'FAILED'}: {requests} requests, {failures} failed, "
        f"server RSS {server_mem.start_mib:.0f} -> {server_mem.end_mib:.0f} MiB, "
        f"client RSS {client_mem.start_mib:.0f} -> {client_mem.end_mib:.0f} MiB",
        file=sys.stderr,
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run vLLM's server as a child process and watch it.

Its output passes through unchanged; SIGTERM and SIGINT are forwarded (vLLM drains in-flight
requests for ``--shutdown-timeout`` seconds); its exit code becomes ours. What vLLM cannot do for
itself is added here: a start-up that never turns ready is stopped after a deadline, and a start-up
that fails ends with one line naming the root cause, dug out of vLLM's multi-process tracebacks.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import IO

# vLLM prefixes the lines of its processes: "(EngineCore pid=12) ERROR 11-25 08:59:04 [core.py:1510] ".
_LOG_PREFIX = re.compile(
    r"^(?:\(\w+ pid=\d+\)\s*)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S+ \[[^\]]*\]\s*)?"
)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b:")
_QUALIFIER = re.compile(r"^(?:[A-Za-z_]\w*\.)+")  # pydantic_core._pydantic_core.ValidationError
_TAIL_LINES = 2000
_MAX_CAUSE_CHARS = 400
_PR_SET_PDEATHSIG = 1


def root_cause(lines: Iterable[str]) -> str:
    """The first exception raised in a log (vLLM re-raises a worker's error two or three times,
    wrapped; the first is the cause), with the detail lines pydantic puts under it."""
    cleaned = [_LOG_PREFIX.sub("", text.rstrip()) for line in lines for text in _unpack(line)]
    start = next((i for i, line in enumerate(cleaned) if line.startswith("Traceback")), 0)
    for i in range(start, len(cleaned)):
        if _EXCEPTION.match(cleaned[i]):
            parts = [_QUALIFIER.sub("", cleaned[i])]
            # pydantic says which field and why on the lines under "N validation error(s) for X".
            details = cleaned[i + 1 : i + 5] if "validation error" in cleaned[i] else []
            for detail in details:
                if not detail.strip() or detail.startswith(("Traceback", "  File")):
                    break
                if "https://errors.pydantic.dev" in detail or _EXCEPTION.match(detail):
                    break
                parts.append(detail.strip())
            return _shorten(" ".join(parts))
    last = next((line for line in reversed(cleaned) if line.strip()), "no output")
    return _shorten(last.strip())


def _unpack(line: str) -> list[str]:
    """A JSON log record (--log-format json) as the lines it stands for: message, then traceback."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return [line]
        if isinstance(record, dict):
            return [str(record.get("message", "")), *str(record.get("exc_info") or "").splitlines()]
    return [line]


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_CAUSE_CHARS else text[: _MAX_CAUSE_CHARS - 3] + "..."


def _die_with_parent() -> None:
    # If the supervisor is killed outright, vLLM still gets a SIGTERM and drains instead of
    # living on as an orphan holding the port.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def probe(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        health_url: str,
        base_url: str,
        startup_timeout: float,
        stop_timeout: float,
        drain_flag: Path | None = None,
    ) -> None:
        self.argv, self.env = argv, env
        self.drain_flag = drain_flag
        self.health_url, self.base_url = health_url, base_url
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._process: subprocess.Popen[bytes] | None = None
        self._stop_deadline: float | None = None

    def run(self) -> int:
        self._process = process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        pumps = [
            threading.Thread(target=self._pump, args=(process.stdout, sys.stdout.buffer), daemon=True),
            threading.Thread(target=self._pump, args=(process.stderr, sys.stderr.buffer), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ready, timed_out = self._watch(process)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.drain_flag is not None:
                self.drain_flag.unlink(missing_ok=True)
        for pump in pumps:
            pump.join(timeout=5)
        code = process.returncode
        if timed_out:
            _say(f"error: vLLM was not ready after {self.startup_timeout:g}s; stopped it (--startup-timeout)")
            return 1
        status = 128 - code if code < 0 else code  # a shell's status for "killed by a signal"
        if self._stop_deadline is not None:  # stopped by a signal: vLLM's own verdict stands
            return status
        how = ended(code)
        # Unasked, a server never stops. vLLM exits 0 when its engine dies, which a process
        # manager must not mistake for a clean stop.
        _say(f"error: vLLM {how} {'unexpectedly' if ready else 'during start-up'}: {root_cause(self.tail)}")
        return status or 1

    def _watch(self, process: subprocess.Popen[bytes]) -> tuple[bool, bool]:
        """Wait for the child to exit, announcing readiness; (ready, startup timed out)."""
        ready_deadline = time.monotonic() + self.startup_timeout
        ready = timed_out = False
        while process.poll() is None:
            now = time.monotonic()
            if self._stop_deadline is not None and now > self._stop_deadline:
                process.kill()  # it outlived --shutdown-timeout plus a grace period
            elif not ready and self._stop_deadline is None:
                if probe(self.health_url) == 200:
                    ready = True
                    self.tail.clear()  # a later failure's cause is in what comes after
                    _say(f"ready: {self.base_url}")
                elif now > ready_deadline:
                    timed_out = True
                    self._stop(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)
        return ready, timed_out

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        self._stop(signal.Signals(signum))

    def _stop(self, sig: signal.Signals) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.stop_timeout
            if self.drain_flag is not None:
                # The middleware answers /health and new requests with 503 from now on, so load
                # balancers move on while vLLM finishes the requests it has.
                self.drain_flag.touch()
        self._process.send_signal(sig)

    def _pump(self, source: IO[bytes] | None, sink: IO[bytes]) -> None:
        _pump(source, sink, self.tail)


def ended(code: int) -> str:
    """How a child with this return code ended, as a sentence's predicate."""
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _pump(source: IO[bytes] | None, sink: IO[bytes], tail: collections.deque[str]) -> None:
    """Pass a child's output through unchanged, keeping its last lines for the error message."""
    assert source is not None
    for raw in iter(source.readline, b""):
        sink.write(raw)
        sink.flush()
        tail.append(raw.decode(errors="replace"))
    source.close()


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


# -- several engines and a balancer ------------------------------------------------------------


# A dead engine is started again this many times, then left dead (the others go on serving).
MAX_ENGINE_RESTARTS = 3
# Seconds an engine stopped before it was ever ready may take to exit before it is killed.
STARTING_STOP_S = 30


class Child:
    """One process of an engine group: its output passes through, the tail is kept for the cause
    of a failure."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cores: tuple[int, ...] = ()) -> None:
        self.name, self.argv, self.env, self.cores = name, argv, env, cores
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.process: subprocess.Popen[bytes] | None = None
        self._pumps: list[threading.Thread] = []

    def start(self) -> None:
        cores = self.cores

        def setup() -> None:
            _die_with_parent()
            if cores:
                # Inherited by every process vLLM starts (API server, engine core, workers).
                os.sched_setaffinity(0, cores)

        self.process = process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=setup
        )
        self._pumps = [
            threading.Thread(target=self._pump, args=(process.stdout, sys.stdout.buffer), daemon=True),
            threading.Thread(target=self._pump, args=(process.stderr, sys.stderr.buffer), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def join_output(self) -> None:
        for pump in self._pumps:
            pump.join(timeout=5)

    def how_it_ended(self) -> str:
        code = self.poll()
        return "is running" if code is None else ended(code)

    def _pump(self, source: IO[bytes] | None, sink: IO[bytes]) -> None:
        _pump(source, sink, self.tail)


class EngineGroup:
    """Several engines and the balancer in front of them, run as one server.

    Start-up: engines one after another (on a GPU each profiles its memory alone), each until its
    /health is 200, then the balancer; an engine that dies while starting, or outlasts
    --startup-timeout, stops everything with one line. Running: an engine that dies is reported
    with its cause and started again (up to MAX_ENGINE_RESTARTS times) while the others go on
    serving (the balancer's health checks route around it until it is back); when none is left,
    or the balancer dies, serve stops with exit code 1. SIGTERM/SIGINT: the
    drain flag turns every engine's /health and new requests to 503, every engine finishes its
    in-flight requests, then the balancer, which carried their answers, stops last.
    """

    def __init__(
        self,
        engines: list[Child],
        engine_health_urls: list[str],
        balancer: Child,
        *,
        health_url: str,
        base_url: str,
        startup_timeout: float,
        stop_timeout: float,
        drain_flag: Path | None = None,
    ) -> None:
        self.engines, self.engine_health_urls, self.balancer = engines, engine_health_urls, balancer
        self.health_url, self.base_url = health_url, base_url
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.drain_flag = drain_flag
        self._stopping: signal.Signals | None = None
        self._ready: set[str] = set()  # engines that have answered /health with 200

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = self._start()
            if code is None:
                code = self._serve()
            return code
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.drain_flag is not None:
                self.drain_flag.unlink(missing_ok=True)
            for child in [*self.engines, self.balancer]:
                child.join_output()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = signal.Signals(signum)

    def _start(self) -> int | None:
        """None once everything is ready, else the exit code."""
        for engine, health in zip(self.engines, self.engine_health_urls, strict=True):
            _say(f"starting {engine.name} ({len(self.engines)} in all, one after another)")
            engine.start()
            deadline = time.monotonic() + self.startup_timeout
            while probe(health) != 200:
                if self._stopping is not None:
                    return 128 + int(self._stopping)
                if engine.poll() is not None:
                    _say(
                        f"error: {engine.name} {engine.how_it_ended()} during start-up: {root_cause(engine.tail)}"
                    )
                    return 1
                if time.monotonic() > deadline:
                    _say(
                        f"error: {engine.name} was not ready after {self.startup_timeout:g}s; stopped it (--startup-timeout)"
                    )
                    return 1
                time.sleep(0.5)
            engine.tail.clear()
            self._ready.add(engine.name)
        self.balancer.start()
        deadline = time.monotonic() + 60
        while probe(self.health_url) != 200:
            if self._stopping is not None:
                return 128 + int(self._stopping)
            if self.balancer.poll() is not None or time.monotonic() > deadline:
                _say(  # a balancer still running here did not answer within the deadline
                    f"error: the balancer {self.balancer.how_it_ended()} during start-up: {root_cause(self.balancer.tail)}"
                )
                return 1
            time.sleep(0.2)
        _say(f"ready: {self.base_url} ({len(self.engines)} engines)")
        return None

    def _serve(self) -> int:
        restarts = dict.fromkeys(range(len(self.engines)), 0)
        given_up: set[int] = set()
        coming_back: set[int] = set()
        while self._stopping is None:
            if self.balancer.poll() is not None:
                _say(
                    f"error: the balancer {self.balancer.how_it_ended()} unexpectedly: "
                    f"{root_cause(self.balancer.tail)}"
                )
                return 1
            for i, engine in enumerate(self.engines):
                if i in coming_back and probe(self.engine_health_urls[i]) == 200:
                    coming_back.discard(i)
                    engine.tail.clear()
                    self._ready.add(engine.name)
                    _say(f"{engine.name} is back")
                if engine.poll() is None or i in given_up:
                    continue
                alive = sum(e.poll() is None for e in self.engines)
                cause = f"{engine.name} {engine.how_it_ended()} unexpectedly"
                if (engine.poll() or 0) >= 0:  # a signal is its own cause; the log's last line is not
                    cause += f": {root_cause(engine.tail)}"
                if restarts[i] >= MAX_ENGINE_RESTARTS:
                    given_up.add(i)
                    _say(f"error: {cause}; not restarted again ({alive} of {len(self.engines)} engines left)")
                    continue
                restarts[i] += 1
                _say(
                    f"error: {cause}; {alive} of {len(self.engines)} engines serve while it restarts "
                    f"({restarts[i]} of {MAX_ENGINE_RESTARTS})"
                )
                engine.join_output()
                engine.tail.clear()
                self._ready.discard(engine.name)
                engine.start()
                coming_back.add(i)
            if len(given_up) == len(self.engines):
                _say("error: no engine left; stopping")
                return 1
            time.sleep(0.5)
        # Stopped by a signal: the engines' own verdict stands, as with one engine.
        codes = self._stop_all()
        statuses = [128 - c if c < 0 else c for c in codes if c is not None]
        return max(statuses, default=0)

    def _stop_all(self) -> list[int | None]:
        """Drain and stop the engines, then the balancer; every engine's exit code."""
        if self.drain_flag is not None and any(e.poll() is None for e in self.engines):
            # Readiness turns red and new requests get a retryable 503 from every engine, while
            # in-flight ones finish and their answers still pass through the balancer.
            self.drain_flag.touch()
        for engine in self.engines:
            engine.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for engine in self.engines:
            if engine.process is None:
                continue
            try:
                # One still starting has nothing in flight to finish.
                until = (
                    deadline
                    if engine.name in self._ready
                    else min(deadline, time.monotonic() + STARTING_STOP_S)
                )
                engine.process.wait(timeout=max(0.1, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                engine.process.kill()  # it outlived --shutdown-timeout plus a grace period
                engine.process.wait()
        self.balancer.signal(signal.SIGTERM)
        if self.balancer.process is not None:
            try:
                self.balancer.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.balancer.process.kill()
                self.balancer.process.wait()
        return [engine.poll() for engine in self.engines]

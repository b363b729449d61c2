"""Run vLLM's OpenAI server as one server process: one engine on the serving port, or several
behind a balancer, with one lifecycle for both (EngineGroup).

Every child's output passes through unchanged; SIGTERM and SIGINT go to every engine (vLLM drains
in-flight requests for ``--shutdown-timeout`` seconds); the engines' exit code becomes ours. What
vLLM cannot do for itself is added here: a start-up that never turns ready is stopped after a
deadline, and a start-up that fails ends with one line naming the root cause, dug out of vLLM's
multi-process tracebacks.
"""

from __future__ import annotations

import collections
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


def ended(code: int) -> str:
    """How a child with this return code ended, as a sentence's predicate."""
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def exit_status(code: int) -> int:
    """A child's return code as a shell's status: 128 + N for "killed by signal N"."""
    return 128 - code if code < 0 else code


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


# A dead engine is started again this many times while the others serve, then left dead.
MAX_ENGINE_RESTARTS = 3
# Seconds an engine stopped before it was ever ready may take to exit before it is killed.
STARTING_STOP_S = 30
BALANCER_READY_S = 60


class Child:
    """One process of the server (an engine, the balancer): its output passes through, the tail is
    kept for the cause of a failure."""

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

    def stop(self, timeout: float) -> None:
        """Wait this long for the signalled process to exit, then kill it."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()  # it outlived --shutdown-timeout plus a grace period
            self.process.wait()

    def join_output(self) -> None:
        for pump in self._pumps:
            pump.join(timeout=5)

    def how_it_ended(self) -> str:
        code = self.poll()
        return "is running" if code is None else ended(code)

    def _pump(self, source: IO[bytes] | None, sink: IO[bytes]) -> None:
        assert source is not None
        for raw in iter(source.readline, b""):
            sink.write(raw)
            sink.flush()
            self.tail.append(raw.decode(errors="replace"))
        source.close()


class EngineGroup:
    """vLLM engines run as one server: one on the serving port, or several behind the balancer.

    Start-up: engines one after another (on a GPU each profiles its memory alone), each until its
    /health is 200, then the balancer if there is one; an engine that dies while starting (its
    exit code is serve's, 1 for 0) or outlasts --startup-timeout (1) stops everything with one line.
    Running: an engine that dies is reported with its cause. With several, it is started again (up
    to MAX_ENGINE_RESTARTS times) while the others serve, the balancer routing around it. When
    none is left, serve exits with the last one's exit code, 1 for 0: vLLM exits 0 when its engine
    dies, which a process manager must not mistake for a clean stop. The balancer dying is exit 1.
    SIGTERM/SIGINT: the drain flag turns every engine's /health and new requests to 503, the signal
    goes to every engine, each finishes its in-flight requests, then the balancer, which carried
    their answers, stops last; the engines' own exit code is serve's.
    """

    def __init__(
        self,
        engines: list[Child],
        engine_health_urls: list[str],
        balancer: Child | None,
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
        # One engine alone is not restarted here: nothing would serve meanwhile, so serve exits
        # and the process manager, which sees every crash and backs off, restarts it.
        self.max_restarts = MAX_ENGINE_RESTARTS if len(engines) > 1 else 0
        self._stopping: signal.Signals | None = None
        self._ready: set[str] = set()  # engines that have answered /health with 200

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        code: int | None = None
        try:
            code = self._start()
            if code is None and self._stopping is None:
                code = self._serve()
        finally:
            codes = self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.drain_flag is not None:
                self.drain_flag.unlink(missing_ok=True)
            for child in [*self.engines, *([self.balancer] if self.balancer else [])]:
                child.join_output()
        if code is None:  # stopped by a signal: the engines' own verdict stands
            return max((exit_status(c) for c in codes if c is not None), default=0)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = signal.Signals(signum)

    def _start(self) -> int | None:
        """The exit code when start-up fails; None once everything is ready, or a signal came."""
        several = len(self.engines) > 1
        for engine, health in zip(self.engines, self.engine_health_urls, strict=True):
            if several:
                _say(f"starting {engine.name} ({len(self.engines)} in all, one after another)")
            engine.start()
            deadline = time.monotonic() + self.startup_timeout
            while probe(health) != 200:
                code = engine.poll()
                if self._stopping is not None:
                    return None
                if code is not None:
                    _say(f"error: {engine.name} {ended(code)} during start-up: {root_cause(engine.tail)}")
                    return exit_status(code) or 1
                if time.monotonic() > deadline:
                    _say(
                        f"error: {engine.name} was not ready after {self.startup_timeout:g}s; stopped it (--startup-timeout)"
                    )
                    return 1
                time.sleep(0.5)
            engine.tail.clear()  # a later failure's cause is in what comes after
            self._ready.add(engine.name)
        if self.balancer is not None:
            self.balancer.start()
            deadline = time.monotonic() + BALANCER_READY_S
            while probe(self.health_url) != 200:
                if self._stopping is not None:
                    return None
                if self.balancer.poll() is not None or time.monotonic() > deadline:
                    _say(  # a balancer still running here did not answer within the deadline
                        f"error: the balancer {self.balancer.how_it_ended()} during start-up: {root_cause(self.balancer.tail)}"
                    )
                    return 1
                time.sleep(0.2)
        _say(f"ready: {self.base_url}" + (f" ({len(self.engines)} engines)" if several else ""))
        return None

    def _serve(self) -> int | None:
        """The exit code when serving ends by itself; None when a signal ends it."""
        count = len(self.engines)
        restarts = [0] * count
        given_up: set[int] = set()
        coming_back: set[int] = set()
        while self._stopping is None:
            if self.balancer is not None and self.balancer.poll() is not None:
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
                code = engine.poll()
                if code is None or i in given_up:
                    continue
                alive = sum(e.poll() is None for e in self.engines)
                cause = f"{engine.name} {ended(code)} unexpectedly"
                if code >= 0:  # a signal is its own cause; the log's last line is not
                    cause += f": {root_cause(engine.tail)}"
                if restarts[i] >= self.max_restarts:
                    given_up.add(i)
                    left = f"; not restarted again ({alive} of {count} engines left)" if count > 1 else ""
                    _say(f"error: {cause}{left}")
                    if len(given_up) == count:
                        return exit_status(code) or 1
                    continue
                restarts[i] += 1
                _say(
                    f"error: {cause}; {alive} of {count} engines serve while it restarts "
                    f"({restarts[i]} of {self.max_restarts})"
                )
                engine.join_output()
                engine.tail.clear()
                self._ready.discard(engine.name)
                engine.start()
                coming_back.add(i)
            time.sleep(0.5)
        return None

    def _stop_all(self) -> list[int | None]:
        """Drain and stop the engines, then the balancer; every engine's exit code."""
        if self.drain_flag is not None and any(e.poll() is None for e in self.engines):
            # Readiness turns red and new requests get a retryable 503 from every engine, while
            # in-flight ones finish and their answers still pass through the balancer.
            self.drain_flag.touch()
        for engine in self.engines:
            engine.signal(self._stopping or signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for engine in self.engines:
            # One still starting has nothing in flight to finish.
            until = (
                deadline if engine.name in self._ready else min(deadline, time.monotonic() + STARTING_STOP_S)
            )
            engine.stop(until - time.monotonic())
        if self.balancer is not None:
            self.balancer.signal(signal.SIGTERM)
            self.balancer.stop(30)
        return [engine.poll() for engine in self.engines]

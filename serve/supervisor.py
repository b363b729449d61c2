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
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
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
        assert source is not None
        for raw in iter(source.readline, b""):
            sink.write(raw)
            sink.flush()
            self.tail.append(raw.decode(errors="replace"))
        source.close()


def _say(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)

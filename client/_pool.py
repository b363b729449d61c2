"""Which server each attempt goes to, and which failures make a server sit out.

Several base URLs make one pool of servers: each attempt goes to the server with the fewest
requests in flight (ties in turn); a server that cannot be reached or answers 502/503/504 sits out
a short cool-down, and the next attempt goes at once to another server. Attempts are sequential,
never hedged, so a request is answered, and counted, once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from client._constants import SERVER_COOLDOWN

# Answers that say the server (or the proxy before it) cannot serve now: try another one.
_DOWN_STATUS = frozenset({502, 503, 504})


@dataclass
class _Server:
    index: int
    url: str
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic() until which it sits out; 0: up


@dataclass
class _Call:
    """One call's attempts: the servers tried, how many, and whether every failure looked like
    an outage (connection failed, or 502/503/504)."""

    tried: set[int]
    attempts: int = 0
    down: bool = True
    last_url: str = ""


class _Pool:
    """Which server the next attempt goes to. Thread-safe: the sync client calls from threads."""

    def __init__(self, urls: Sequence[str], cooldown: float = SERVER_COOLDOWN) -> None:
        self.servers = [_Server(i, url) for i, url in enumerate(urls)]
        self.cooldown = cooldown
        self._lock = threading.Lock()
        self._turn = 0

    def _up(self, now: float) -> list[_Server]:
        return [s for s in self.servers if s.down_until <= now]

    def pick(self, tried: set[int]) -> _Server:
        """Up servers this call has not tried first, then any up server, the fewest in flight
        first (ties in turn); when all are down, the untried one whose cool-down ends first."""
        with self._lock:
            up = self._up(time.monotonic())
            group = [s for s in up if s.index not in tried] or up
            if group:
                n, turn = len(self.servers), self._turn
                self._turn += 1
                server = min(group, key=lambda s: (s.in_flight, (s.index - turn) % n))
            else:
                server = min(self.servers, key=lambda s: (s.index in tried, s.down_until))
            server.in_flight += 1
            return server

    @contextmanager
    def use(self, call: _Call) -> Iterator[_Server]:
        server = self.pick(call.tried)
        call.tried.add(server.index)
        call.attempts += 1
        call.last_url = server.url
        try:
            yield server
        except BaseException as exc:
            down = _marks_down(exc)
            call.down = call.down and _unreachable(exc)
            with self._lock:
                server.in_flight -= 1
                if down:
                    server.down_until = time.monotonic() + self.cooldown
            raise
        with self._lock:
            server.in_flight -= 1
            server.down_until = 0.0

    def untried_up(self, tried: set[int]) -> bool:
        with self._lock:
            return any(s.index not in tried for s in self._up(time.monotonic()))


def _marks_down(exc: BaseException) -> bool:
    """A failure after which the server sits out a cool-down: it is not there, or not whole
    (rather than slow, or failing this one request)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in _DOWN_STATUS
    if isinstance(exc, httpx.TimeoutException):
        return isinstance(exc, httpx.ConnectTimeout)
    return isinstance(exc, httpx.TransportError) and not _local(exc)  # refused, reset, disconnected


def _unreachable(exc: BaseException) -> bool:
    """A failure that says no server is there: no connection could be made, or the server (or its
    proxy) said it cannot serve now. A connection dropped mid-request is not one: a request that
    crashes its worker does that too."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in _DOWN_STATUS
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def _local(exc: BaseException) -> bool:
    """A request this side could not send (an invalid header, a scheme httpx lacks): no server
    was involved, and sending it again fails the same way."""
    return isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol)

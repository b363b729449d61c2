"""When an attempt is tried again, and after how long: openai-python's policy.

408/409/429/5xx and connection failures are retried with its backoff; ``x-should-retry`` and
Retry-After are honoured. A pool of servers tries every server once beyond ``max_retries``, and
fails over at once to a server this call has not tried.
"""

from __future__ import annotations

import email.utils
import random
import time
from typing import Any

import httpx
from tenacity import RetryCallState, stop_after_attempt

from client._constants import BACKOFF_INITIAL, BACKOFF_MAX, RETRY_AFTER_MAX
from client._pool import _Call, _local, _Pool

RETRYABLE_STATUS = frozenset({408, 409, 429})


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, else ``retry-after`` as seconds or as
    an HTTP date (as openai-python reads them); None when there is no usable ask."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_tz(value)
        return None if when is None else float(email.utils.mktime_tz(when) - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _honoured_wait(headers: httpx.Headers) -> float | None:
    hint = _retry_after(headers)
    return hint if hint is not None and 0 < hint <= RETRY_AFTER_MAX else None


def _backoff(retry: int) -> float:
    """openai-python's: exponential from 0.5 s, capped, less up to 25 % jitter (so never near 0)."""
    return min(BACKOFF_INITIAL * 2.0 ** min(retry, 64), BACKOFF_MAX) * (1 - 0.25 * random.random())


def _should_retry(exc: BaseException, call: _Call, pool: _Pool) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        headers = exc.response.headers
        # The server knows best, either way (any casing: a server that says "True" means it).
        flag = str(headers.get("x-should-retry", "")).strip().lower()
        if flag in ("true", "false"):
            retry: bool = flag == "true"
        else:
            status = exc.response.status_code
            retry = status in RETRYABLE_STATUS or status >= 500
        hint = _retry_after(headers)
        if retry and hint is not None and hint > RETRY_AFTER_MAX:  # longer than a call waits
            return pool.untried_up(call.tried)
        return retry
    return isinstance(exc, httpx.TransportError) and not _local(exc)  # timeouts included


class _Wait:
    """openai-python's backoff, or the server's Retry-After where it gave a usable one; no wait
    when an up server this call has not tried is there to fail over to."""

    def __init__(self, pool: _Pool, call: _Call) -> None:
        self._pool, self._call = pool, call

    def __call__(self, state: RetryCallState) -> float:
        if self._pool.untried_up(self._call.tried):
            return 0.0
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, httpx.HTTPStatusError):
            hint = _honoured_wait(exc.response.headers)
            if hint is not None:
                return hint
        return _backoff(state.attempt_number - 1)


def _retry_kwargs(pool: _Pool, call: _Call, max_retries: int) -> dict[str, Any]:
    """One call's retry policy, for tenacity: ``max_retries`` retries, and beyond them every server
    once (at most one more attempt per server, whatever the others' cool-downs)."""
    n = len(pool.servers)
    retries = stop_after_attempt(max_retries + 1)
    cap = stop_after_attempt(max_retries + n)
    return {
        "stop": lambda state: retries(state) and (len(call.tried) == n or cap(state)),
        "wait": _Wait(pool, call),
        "retry": lambda state: (
            _should_retry(state.outcome.exception(), call, pool)
            if state.outcome and state.outcome.failed
            else False
        ),
        "reraise": False,
    }

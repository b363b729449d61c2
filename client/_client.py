"""EndpointClient and AsyncEndpointClient: the same methods, one blocking, one async.

Plain httpx underneath (the OpenAI SDK parses a malformed answer into objects that fail later with
AttributeError, and its typed create() costs ~1 ms a call); the behaviour follows openai-python:
retries of 408/409/429/5xx and of connection failures with its backoff, ``x-should-retry`` and
Retry-After honoured, errors that carry the status, request id, response and body. This module is
the only retry layer, so retries are counted and bounded once.

Several base URLs make one pool of servers: each attempt goes to the server with the fewest
requests in flight (ties in turn); a server that cannot be reached or answers 502/503/504 sits out
a short cool-down, and the next attempt goes at once to another server. Attempts are sequential,
never hedged, so a request is answered, and counted, once.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import functools
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState, RetryError, Retrying, stop_after_attempt

from client._constants import (
    API_KEY_ENV,
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    RETRY_AFTER_MAX,
    SERVER_COOLDOWN,
)
from client._exceptions import (
    APITimeoutError,
    AuthenticationError,
    ClientClosedError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RateLimitError,
    RequestRejectedError,
    ServerUnavailableError,
)
from client.grounding import GroundingWarning, check_grounding
from client.models import EndpointExtraction
from client.prompt import build_messages

RETRYABLE_STATUS = frozenset({408, 409, 429})
# Answers that say the server (or the proxy before it) cannot serve now: try another one.
_DOWN_STATUS = frozenset({502, 503, 504})
# httpx's own default, which a given http_client has unless its owner chose a timeout.
_HTTPX_DEFAULT_TIMEOUT = httpx.Timeout(5.0)
_Self = TypeVar("_Self", bound="_BaseClient")
_T = TypeVar("_T")


@dataclass
class Usage:
    """Tokens and requests spent: every 2xx answer is counted, retried calls included."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ExtractionResult:
    """One item of ``extract_many``: ``value`` when it worked, ``error`` when it did not.
    ``warnings``: grounding warnings on ``value``, filled only by a client made with
    ``grounding=True``; ``value`` itself is the model's answer as is."""

    index: int
    value: EndpointExtraction | None = None
    error: EndpointError | None = None
    warnings: tuple[GroundingWarning, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class _Options:
    """What ``with_options`` may change; everything else is shared by the copies."""

    api_key: str | None
    model: str
    timeout: httpx.Timeout
    max_retries: int
    max_tokens: int | None  # None: the server's own cap
    grounding: bool

    @functools.cached_property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


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


class _Shared:
    """What a client and its ``with_options`` copies share: the servers, the connection pool and
    the usage counter."""

    def __init__(self, urls: Sequence[str], http: httpx.Client | httpx.AsyncClient) -> None:
        self.pool = _Pool(urls)
        self.http = http
        self.usage = Usage()
        self.usage_lock = threading.Lock()
        self.closed = False


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


def _base_urls(base_url: str | Sequence[str] | None) -> tuple[str, ...]:
    if base_url is None:
        base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
    if not urls or not all(isinstance(url, str) and url for url in urls):
        raise ValueError("base_url must be a URL or a non-empty sequence of URLs")
    if len(set(urls)) != len(urls):
        raise ValueError(f"base_url lists a server twice: {', '.join(urls)}")
    for url in urls:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise ValueError(f"base_url {url!r} is not a URL: {exc}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"base_url {url!r} is not an http:// or https:// URL")
    return tuple(url.rstrip("/") for url in urls)


def _api_key(api_key: str | None) -> str | None:
    name = "api_key"
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None  # empty: unset, as a shell `X=` means
        if api_key is None:
            return None
        # Checked as an argument is: an unsendable key would otherwise fail inside the HTTP layer,
        # whose error quotes the header, key and all.
        name = API_KEY_ENV
    if not isinstance(api_key, str) or not api_key.strip():
        raise ValueError(
            f"{name} must be a non-empty string; leave it out (and {API_KEY_ENV} unset) for none"
        )
    if not (api_key.isascii() and api_key.isprintable()) or api_key != api_key.strip():
        raise ValueError(
            f"{name} holds whitespace, control or non-ASCII characters: it cannot go in a header"
        )
    return api_key


def _timeout(timeout: object, http_client: httpx.Client | httpx.AsyncClient | None) -> httpx.Timeout:
    """Never no timeout: None means the http_client's own (when its owner set one) or the default."""
    if timeout is None:
        if http_client is not None and http_client.timeout != _HTTPX_DEFAULT_TIMEOUT:
            return http_client.timeout
        return DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if (
        isinstance(timeout, int | float)
        and not isinstance(timeout, bool)
        and math.isfinite(timeout)
        and timeout > 0
    ):
        return httpx.Timeout(timeout)
    raise TypeError(f"timeout must be seconds (a positive number) or an httpx.Timeout, not {timeout!r}")


def _count(name: str, value: object, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}")
    return value


def _options(
    api_key: str | None,
    model: str,
    timeout: object,
    max_retries: int,
    max_tokens: int | None,
    grounding: bool,
    http_client: httpx.Client | httpx.AsyncClient | None,
) -> _Options:
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a non-empty string")
    if not isinstance(grounding, bool):
        raise TypeError(f"grounding must be a bool, not {type(grounding).__name__}")
    _check_text(model, "model")
    return _Options(
        api_key=_api_key(api_key),
        model=model,
        timeout=_timeout(timeout, http_client),
        max_retries=_count("max_retries", max_retries, 0),
        max_tokens=None if max_tokens is None else _count("max_tokens", max_tokens, 1),
        grounding=grounding,
    )


@functools.cache
def _constant_body() -> dict[str, Any]:
    """The part of every extraction request that never changes, built once (generating the schema
    costs ~1 ms). Shared by all requests: never mutate it."""
    schema = {"name": "EndpointExtraction", "schema": EndpointExtraction.model_json_schema(), "strict": True}
    return {
        "response_format": {"type": "json_schema", "json_schema": schema},
        "chat_template_kwargs": {"enable_thinking": False},
    }


def _check_text(text: object, what: str = "text") -> str:
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a string, not {type(text).__name__}")
    if not text.strip():
        raise InvalidInputError(f"{what} is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        found = text[exc.start : exc.end]
        raise InvalidInputError(
            f"{what} holds a lone surrogate ({found!a}) at character {exc.start}: it is not valid Unicode"
        ) from None
    return text


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


def _local(exc: BaseException) -> bool:
    """A request this side could not send (an invalid header, a scheme httpx lacks): no server
    was involved, and sending it again fails the same way."""
    return isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol)


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


def _decode(response: httpx.Response) -> object:
    """The body as JSON, else its text (None when empty)."""
    try:
        return response.json()
    except (ValueError, RecursionError):
        return response.text or None


def _server_message(body: object, response: httpx.Response) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        for found in (
            err.get("message") if isinstance(err, dict) else err,
            body.get("message"),
            body.get("detail"),
        ):
            if isinstance(found, str) and found.strip():
                return _one_line(found)
    if isinstance(body, str) and body.strip():
        return _one_line(body)
    return response.reason_phrase or f"HTTP {response.status_code}"


def _one_line(text: str, limit: int = 500) -> str:
    """A server's text as one line of at most ``limit`` characters: it goes into error messages,
    which callers log and the CLI prints as one line."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _tokens(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a ``usage`` object; None when it is not one."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        return None
    prompt, completion = (usage.get(key) or 0 for key in ("prompt_tokens", "completion_tokens"))
    for n in (prompt, completion):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return None
    return prompt, completion


def _not_a_completion(body: object) -> str | None:
    """What makes a decoded 2xx body not a chat completion; None when it is one."""
    if not isinstance(body, dict):
        return f"answer is a JSON {type(body).__name__}, not a chat completion"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return f"answer has no choices (choices is {choices!r:.40})"
    for i, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            return f"answer's choices[{i}].message is {type(message).__name__}, not an object"
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            return f"answer's choices[{i}].message.content is {type(content).__name__}, not text"
    if _tokens(body.get("usage")) is None:
        return f"answer's usage is not token counts ({body.get('usage')!r:.60})"
    return None


class _BaseClient:
    def __init__(
        self,
        base_url: str | Sequence[str] | None,
        *,
        api_key: str | None,
        model: str,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        max_tokens: int | None,
        max_connections: int,
        grounding: bool,
        http_client: httpx.Client | httpx.AsyncClient | None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None,
    ) -> None:
        urls = _base_urls(base_url)
        self._options = _options(api_key, model, timeout, max_retries, max_tokens, grounding, http_client)
        if http_client is not None and transport is not None:
            raise ValueError("give http_client or transport, not both (set the transport on the http_client)")
        # With the caller's http_client, its own limits apply and are not known here.
        self._max_connections = (
            None if http_client is not None else _count("max_connections", max_connections, 1)
        )
        self._closed = False
        self._owner = True
        self._shared = _Shared(
            urls,
            http_client
            if http_client is not None
            else self._new_http(transport, self._options.timeout, max_connections),
        )

    def _new_http(
        self,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None,
        timeout: httpx.Timeout,
        size: int,
    ) -> httpx.Client | httpx.AsyncClient:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        """The first server's URL (the only one, for a client of one server)."""
        return self._shared.pool.servers[0].url

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every server this client spreads its requests over."""
        return tuple(s.url for s in self._shared.pool.servers)

    @property
    def model(self) -> str:
        return self._options.model

    @property
    def usage(self) -> Usage:
        """Shared with the client's ``with_options`` copies."""
        return self._shared.usage

    @property
    def _pool(self) -> _Pool:
        return self._shared.pool

    def with_options(
        self: _Self,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        max_tokens: int | None = None,
        grounding: bool | None = None,
    ) -> _Self:
        """A copy with some options changed; this client is left as it is. The copy shares this
        client's servers, connection pool and usage counter; closing the copy leaves them open,
        closing this client closes the copy too."""
        o = self._options
        new = _options(
            o.api_key if api_key is None else api_key,
            o.model if model is None else model,
            o.timeout if timeout is None else timeout,
            o.max_retries if max_retries is None else max_retries,
            o.max_tokens if max_tokens is None else max_tokens,
            o.grounding if grounding is None else grounding,
            None,
        )
        clone = copy.copy(self)
        clone._options = new
        clone._owner = False
        clone._closed = False
        return clone

    def _check_open(self) -> None:
        if self._closed or self._shared.closed:
            raise ClientClosedError("the client is closed; make a new one")
        if self._shared.http.is_closed:
            raise ClientClosedError("the client's http_client is closed; make a new client with an open one")

    def _checked(self, index: int, text: str, value: EndpointExtraction) -> ExtractionResult:
        warnings = tuple(check_grounding(text, value)) if self._options.grounding else ()
        return ExtractionResult(index, value=value, warnings=warnings)

    def _request(self, text: str, max_tokens: int | None) -> dict[str, Any]:
        """The JSON body of one extraction request. Without max_tokens the server's cap applies
        (vLLM also fits it to the room the prompt leaves in the context, where a fixed number would
        get a 400 for a long text)."""
        body = {"model": self._options.model, "messages": build_messages(text), "temperature": 0.0}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return {**body, **_constant_body()}

    def _record(self, tokens: tuple[int, int]) -> None:
        usage = self._shared.usage
        with self._shared.usage_lock:
            usage.requests += 1
            usage.prompt_tokens += tokens[0]
            usage.completion_tokens += tokens[1]

    def _json(self, response: httpx.Response) -> object:
        """A 2xx answer's JSON; InvalidOutputError when it is not JSON."""
        try:
            return response.json()
        except (ValueError, RecursionError) as exc:
            raise InvalidOutputError(
                "server answered with a body that is not JSON", raw=response.text, response=response
            ) from exc

    def _completion(self, response: httpx.Response) -> dict[str, Any]:
        """A 2xx answer that must be a chat completion, counted in ``usage`` (no tokens where it
        says none usable); InvalidOutputError for any other shape."""
        try:
            body = self._json(response)
        except InvalidOutputError:
            self._record((0, 0))
            raise
        problem = _not_a_completion(body)
        if problem is not None or not isinstance(body, dict):
            self._record((0, 0))
            raise InvalidOutputError(
                problem or "not a chat completion", raw=response.text, response=response, body=body
            )
        self._record(_tokens(body.get("usage")) or (0, 0))
        return body

    def _retry_kwargs(self, call: _Call) -> dict[str, Any]:
        """One call's retry policy: ``max_retries`` retries, and beyond them every server once
        (at most one more attempt per server, whatever the others' cool-downs)."""
        pool = self._shared.pool
        n = len(pool.servers)
        retries = stop_after_attempt(self._options.max_retries + 1)
        cap = stop_after_attempt(self._options.max_retries + n)
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

    @staticmethod
    def _checked_status(response: httpx.Response) -> httpx.Response:
        if not response.is_success:
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code}", request=response.request, response=response
            )
        return response

    def _fail(self, exc: BaseException, call: _Call) -> EndpointError:
        """The error a caller gets for the last attempt's failure (raised ``from`` it); its message
        never holds the API key, whatever the text it was built from quoted."""
        error = self._translate(exc, call)
        key = self._options.api_key
        if key and key in str(error):
            error.args = (str(error).replace(key, "***"),)
        return error

    def _translate(self, exc: BaseException, call: _Call) -> EndpointError:
        if isinstance(exc, EndpointError):
            return exc
        if _local(exc):
            return InvalidInputError(f"the request cannot be sent: {type(exc).__name__}: {exc}")
        if isinstance(exc, httpx.DecodingError):  # a body its Content-Encoding does not decode
            return InvalidOutputError(
                f"server answered with a body that cannot be decoded: {exc}", raw="", response=None
            )
        servers = len(self._shared.pool.servers)
        n = call.attempts
        said, reached, lead = "server", "the server", ""
        if servers > 1:
            url = httpx.URL(call.last_url)
            said = reached = f"the last ({url.scheme}://{url.netloc.decode()})"
            lead = f"all {servers} servers tried and failed; "
            if len(call.tried) < servers:
                lead = f"{len(call.tried)} of {servers} servers tried and failed, the others cooling down after failures; "
        if isinstance(exc, httpx.HTTPStatusError):
            response = exc.response
            status = response.status_code
            body = _decode(response)
            message = _server_message(body, response)
            if status == 401:
                hint = (
                    f"no API key was given: pass api_key= or set {API_KEY_ENV}"
                    if self._options.api_key is None
                    else "the API key was refused"
                )
                return AuthenticationError(f"{hint} ({message})", response=response, body=body)
            if status in RETRYABLE_STATUS or status >= 500:
                cls = RateLimitError if status == 429 else ServerUnavailableError
                return cls(
                    f"{lead}{said} answered {status} after {n} attempts: {message}",
                    attempts=n,
                    response=response,
                    body=body,
                    server_down=call.down,
                )
            return RequestRejectedError(message, response=response, body=body)
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(
                f"{lead}{reached} timed out after {n} attempts: {type(exc).__name__}: {exc}",
                attempts=n,
                server_down=call.down,
            )
        if isinstance(exc, httpx.TransportError):
            return ServerUnavailableError(
                f"{lead}cannot reach {reached} after {n} attempts: {type(exc).__name__}: {exc}",
                attempts=n,
                server_down=call.down,
            )
        if isinstance(exc, RuntimeError) and self._shared.http.is_closed:
            return ClientClosedError("the client's connection pool was closed during the call")
        return EndpointError(f"unexpected {type(exc).__name__}: {exc}")

    def _answer(self, response: httpx.Response) -> tuple[str, object]:
        """The message text of a chat completion and its finish reason."""
        body = self._completion(response)
        choice = body["choices"][0]
        content = choice["message"]["content"]
        if not isinstance(content, str):  # tool calls: not an answer to an extraction
            raise InvalidOutputError(
                "answer holds tool calls, not text", raw=response.text, response=response, body=body
            )
        return content, choice.get("finish_reason")

    def _extraction(self, response: httpx.Response) -> EndpointExtraction:
        raw, finish = self._answer(response)
        if finish == "length":
            max_tokens = self._options.max_tokens
            limit = f"max_tokens={max_tokens}" if max_tokens is not None else "the server's max_tokens cap"
            raise OutputTruncatedError(
                f"answer cut at {limit} ({len(raw)} characters so far)",
                raw=raw,
                max_tokens=max_tokens,
                response=response,
            )
        try:
            return EndpointExtraction.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "answer"
            raise InvalidOutputError(
                f"answer is not endpoint JSON: {where}: {first['msg']}", raw=raw, response=response
            ) from exc

    def _models(self, response: httpx.Response) -> list[str]:
        body = self._json(response)
        data = body.get("data") if isinstance(body, dict) else None
        names = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if not names or not all(isinstance(name, str) for name in names):
            raise InvalidOutputError(
                "answer is not a list of models", raw=response.text, response=response, body=body
            )
        return [name for name in names if isinstance(name, str)]

    def _texts(self, texts: Iterable[str], concurrency: int) -> list[str]:
        if isinstance(texts, str | bytes):
            raise InvalidInputError("texts must be an iterable of strings, not one string")
        try:
            items = list(texts)
        except TypeError as exc:
            raise InvalidInputError(f"texts must be an iterable of strings: {exc}") from exc
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise InvalidInputError(f"concurrency must be an int >= 1, not {concurrency!r}")
        pool = self._max_connections
        if pool is not None and concurrency > pool:
            raise InvalidInputError(
                f"concurrency {concurrency} exceeds the connection pool ({pool}); "
                f"create the client with max_connections>={concurrency}"
            )
        return items


def _unexpected(exc: Exception) -> EndpointError:
    """Whatever went wrong, callers catch one hierarchy; the cause stays attached."""
    error = EndpointError(f"unexpected {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class EndpointClient(_BaseClient):
    """Blocking client. ``with EndpointClient(url) as client: client.extract(text)``.

    ``EndpointClient([url1, url2, ...])`` spreads the requests over several servers, with fail-over.
    ``base_url`` and ``api_key`` default to ``ENDPOINT_BASE_URL`` and ``ENDPOINT_API_KEY``.
    ``http_client=httpx.Client(...)`` brings your own connection pool (closed with this client);
    ``transport=`` plugs a transport into the one made here.

    ``grounding=True`` makes ``extract_many`` attach grounding warnings (``client.grounding``) to
    each result; for one text, call ``check_grounding(text, client.extract(text))``."""

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        grounding: bool = False,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if http_client is not None and not isinstance(http_client, httpx.Client):
            raise TypeError(
                f"EndpointClient needs an httpx.Client as http_client, not {type(http_client).__name__}"
            )
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise TypeError("EndpointClient needs a sync httpx transport")
        super().__init__(
            base_url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            max_tokens=max_tokens,
            max_connections=max_connections,
            grounding=grounding,
            http_client=http_client,
            transport=transport,
        )

    def _new_http(
        self,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None,
        timeout: httpx.Timeout,
        size: int,
    ) -> httpx.Client:
        assert transport is None or isinstance(transport, httpx.BaseTransport)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        return httpx.Client(transport=transport, timeout=timeout, limits=limits)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """One request under the one retry layer; failures come out as EndpointError."""
        self._check_open()
        http = self._shared.http
        assert isinstance(http, httpx.Client)
        call = _Call(set())
        o = self._options
        try:
            for attempt in Retrying(**self._retry_kwargs(call)):
                with attempt, self._shared.pool.use(call) as server:
                    response = http.request(
                        method, server.url + path, json=body, headers=o.headers, timeout=o.timeout
                    )
                    self._checked_status(response)
        except RetryError as exc:
            last = exc.last_attempt.exception() or exc
            raise self._fail(last, call) from last
        except EndpointError:
            raise
        except Exception as exc:
            raise self._fail(exc, call) from exc
        return response

    def served_models(self) -> list[str]:
        """The model names the server serves (``GET /models``; with several, the one asked)."""
        try:
            return self._models(self._send("GET", "/models"))
        except EndpointError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from exc

    def extract(self, text: str) -> EndpointExtraction:
        """Extract the endpoints of one text. Raises an EndpointError subclass on failure, and
        nothing else."""
        try:
            text = _check_text(text)
            return self._extraction(
                self._send("POST", "/chat/completions", self._request(text, self._options.max_tokens))
            )
        except EndpointError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from exc

    def _one(self, index: int, text: str) -> ExtractionResult:
        try:
            return self._checked(index, text, self.extract(text))
        except EndpointError as exc:
            return ExtractionResult(index, error=exc)
        except Exception as exc:
            return ExtractionResult(index, error=_unexpected(exc))

    def extract_many(self, texts: Iterable[str], *, concurrency: int = 8) -> list[ExtractionResult]:
        """Extract every text with up to ``concurrency`` requests in flight. Results come back in
        input order, each a value or an error: one failure never stops the others."""
        items = self._texts(texts, concurrency)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(self._one, range(len(items)), items))

    def close(self) -> None:
        """Close the connection pool (a ``with_options`` copy only marks itself closed)."""
        self._closed = True
        if self._owner and not self._shared.closed:
            self._shared.closed = True
            http = self._shared.http
            assert isinstance(http, httpx.Client)
            http.close()

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEndpointClient(_BaseClient):
    """Async client with the same methods as EndpointClient, as coroutines;
    ``http_client=httpx.AsyncClient(...)`` brings your own connection pool."""

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        grounding: bool = False,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if http_client is not None and not isinstance(http_client, httpx.AsyncClient):
            raise TypeError(
                f"AsyncEndpointClient needs an httpx.AsyncClient as http_client, not {type(http_client).__name__}"
            )
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError("AsyncEndpointClient needs an async httpx transport")
        super().__init__(
            base_url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            max_tokens=max_tokens,
            max_connections=max_connections,
            grounding=grounding,
            http_client=http_client,
            transport=transport,
        )

    def _new_http(
        self,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None,
        timeout: httpx.Timeout,
        size: int,
    ) -> httpx.AsyncClient:
        assert transport is None or isinstance(transport, httpx.AsyncBaseTransport)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        return httpx.AsyncClient(transport=transport, timeout=timeout, limits=limits)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        """One request under the one retry layer; failures come out as EndpointError."""
        self._check_open()
        http = self._shared.http
        assert isinstance(http, httpx.AsyncClient)
        call = _Call(set())
        o = self._options
        try:
            async for attempt in AsyncRetrying(**self._retry_kwargs(call)):
                with attempt, self._shared.pool.use(call) as server:
                    response = await http.request(
                        method, server.url + path, json=body, headers=o.headers, timeout=o.timeout
                    )
                    self._checked_status(response)
        except RetryError as exc:
            last = exc.last_attempt.exception() or exc
            raise self._fail(last, call) from last
        except EndpointError:
            raise
        except Exception as exc:
            raise self._fail(exc, call) from exc
        return response

    async def _guarded(self, work: Awaitable[_T]) -> _T:
        try:
            return await work
        except EndpointError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from exc

    async def served_models(self) -> list[str]:
        return await self._guarded(self._served_models())

    async def _served_models(self) -> list[str]:
        return self._models(await self._send("GET", "/models"))

    async def _post_chat(self, body: dict[str, Any]) -> tuple[httpx.Response, Any]:
        """POST a chat completion body exactly as given (the OpenAI Batch API pass-through), under
        the same retry layer; returns the HTTP response and its JSON body."""

        async def post() -> tuple[httpx.Response, Any]:
            response = await self._send("POST", "/chat/completions", body)
            return response, self._completion(response)

        return await self._guarded(post())

    async def extract(self, text: str) -> EndpointExtraction:
        return await self._guarded(self._extract(text))

    async def _extract(self, text: str) -> EndpointExtraction:
        text = _check_text(text)
        response = await self._send(
            "POST", "/chat/completions", self._request(text, self._options.max_tokens)
        )
        return self._extraction(response)

    async def extract_many(self, texts: Iterable[str], *, concurrency: int = 8) -> list[ExtractionResult]:
        items = self._texts(texts, concurrency)
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> ExtractionResult:
            async with gate:
                try:
                    return self._checked(index, items[index], await self.extract(items[index]))
                except EndpointError as exc:
                    return ExtractionResult(index, error=exc)
                except Exception as exc:
                    return ExtractionResult(index, error=_unexpected(exc))

        return list(await asyncio.gather(*(one(i) for i in range(len(items)))))

    async def close(self) -> None:
        """Close the connection pool (a ``with_options`` copy only marks itself closed)."""
        self._closed = True
        if self._owner and not self._shared.closed:
            self._shared.closed = True
            http = self._shared.http
            assert isinstance(http, httpx.AsyncClient)
            await http.aclose()

    async def __aenter__(self) -> AsyncEndpointClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__: Sequence[str] = ("AsyncEndpointClient", "EndpointClient", "ExtractionResult", "Usage")

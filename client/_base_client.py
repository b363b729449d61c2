"""The transport under both clients: one retry layer over plain httpx, and error translation.

Plain httpx underneath (the OpenAI SDK parses a malformed answer into objects that fail later with
AttributeError, and its typed create() costs ~1 ms a call); the behaviour follows openai-python:
retries of 408/409/429/5xx and of connection failures with its backoff, ``x-should-retry`` and
Retry-After honoured, errors that carry the status, request id, response and body. This module is
the only retry layer, so retries are counted and bounded once. Which server each attempt goes to
is ``client._pool``'s; when to retry and how long to wait, ``client._retry``'s.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, RetryError, Retrying

from client._constants import API_KEY_ENV
from client._exceptions import (
    APITimeoutError,
    AuthenticationError,
    ClientClosedError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    RateLimitError,
    RequestRejectedError,
    ServerUnavailableError,
)
from client._options import _base_urls, _count, _options
from client._pool import _Call, _local, _Pool
from client._retry import RETRYABLE_STATUS, _retry_kwargs

_Self = TypeVar("_Self", bound="_BaseClient")


@dataclass
class Usage:
    """Tokens and requests spent: every 2xx answer is counted, retried calls included."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class _Shared:
    """What a client and its ``with_options`` copies share: the servers, the connection pool and
    the usage counter."""

    def __init__(self, urls: Sequence[str], http: httpx.Client | httpx.AsyncClient) -> None:
        self.pool = _Pool(urls)
        self.http = http
        self.usage = Usage()
        self.usage_lock = threading.Lock()
        self.closed = False


def _unexpected(exc: Exception) -> EndpointError:
    """Whatever went wrong, callers catch one hierarchy; the cause stays attached."""
    error = EndpointError(f"unexpected {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


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
    """What both clients share: options, servers, connection pool and usage, the reading of a chat
    completion, and the translation of every failure into an EndpointError."""

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

    @staticmethod
    def _checked_status(response: httpx.Response) -> httpx.Response:
        if not response.is_success:
            raise httpx.HTTPStatusError(
                f"HTTP {response.status_code}", request=response.request, response=response
            )
        return response

    @contextlib.contextmanager
    def _translated(self, call: _Call) -> Iterator[None]:
        """Whatever one request's retry loop raises comes out as an EndpointError: the last
        attempt's failure once retries are spent, any other failure translated, ours unchanged."""
        try:
            yield
        except RetryError as exc:
            last = exc.last_attempt.exception() or exc
            raise self._fail(last, call) from last
        except EndpointError:
            raise
        except Exception as exc:
            raise self._fail(exc, call) from exc

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


class _SyncAPIClient(_BaseClient):
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
        with self._translated(call):
            for attempt in Retrying(**_retry_kwargs(self._shared.pool, call, o.max_retries)):
                with attempt, self._shared.pool.use(call) as server:
                    response = http.request(
                        method, server.url + path, json=body, headers=o.headers, timeout=o.timeout
                    )
                    self._checked_status(response)
        return response


class _AsyncAPIClient(_BaseClient):
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
        with self._translated(call):
            async for attempt in AsyncRetrying(**_retry_kwargs(self._shared.pool, call, o.max_retries)):
                with attempt, self._shared.pool.use(call) as server:
                    response = await http.request(
                        method, server.url + path, json=body, headers=o.headers, timeout=o.timeout
                    )
                    self._checked_status(response)
        return response

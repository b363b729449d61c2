"""EndpointClient and AsyncEndpointClient: the same methods, one blocking, one async.

Built on the OpenAI SDK with its own retries turned off: this module is the only retry layer
(jittered exponential backoff that honours Retry-After), so retries are counted and bounded once.

Several base URLs make one pool of servers: each attempt goes to the server with the fewest
requests in flight (ties in turn); a server that cannot be reached or answers 502/503/504 sits out
a short cool-down, and the next attempt goes at once to another server. Attempts are sequential,
never hedged, so a request is answered, and counted, once.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import openai
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from client._constants import (
    API_KEY_ENV,
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    RETRY_MAX_TOKENS,
    SERVER_COOLDOWN,
)
from client._exceptions import (
    AuthenticationError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RequestRejectedError,
    ServerUnavailableError,
)
from client.grounding import GroundingWarning, check_grounding
from client.models import EndpointExtraction
from client.prompt import build_messages

RETRYABLE_STATUS = frozenset({408, 409, 429})
# Answers that say the server (or the proxy before it) cannot serve now: try another one.
_DOWN_STATUS = frozenset({502, 503, 504})
# Requests go through the SDK's post(): its typed create() walks every parameter against its
# TypedDicts on each call (about 1 ms for this body, the JSON schema included), and the body here
# is built by this module. Transport, auth, error types and response parsing are still the SDK's.
_CHAT_PATH = "/chat/completions"
_Self = TypeVar("_Self", bound="_BaseClient")
_T = TypeVar("_T")


@dataclass
class Usage:
    """Tokens and requests spent, retries and failed attempts included."""

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


@dataclass
class _Options:
    base_urls: tuple[str, ...]
    api_key: str
    model: str
    timeout: httpx.Timeout
    max_retries: int
    max_tokens: int
    max_connections: int
    transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    grounding: bool = False


@dataclass
class _Server:
    index: int
    url: str
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic() until which it sits out; 0: up


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
    def use(self, tried: set[int]) -> Iterator[_Server]:
        server = self.pick(tried)
        tried.add(server.index)
        try:
            yield server
        except BaseException as exc:
            with self._lock:
                server.in_flight -= 1
                if _marks_down(exc):
                    server.down_until = time.monotonic() + self.cooldown
            raise
        with self._lock:
            server.in_flight -= 1
            server.down_until = 0.0

    def untried_up(self, tried: set[int]) -> bool:
        with self._lock:
            return any(s.index not in tried for s in self._up(time.monotonic()))


def _marks_down(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # refused, reset, timed out
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code in _DOWN_STATUS


def _base_urls(base_url: str | Sequence[str] | None) -> tuple[str, ...]:
    if base_url is None:
        base_url = os.environ.get("ENDPOINT_BASE_URL") or DEFAULT_BASE_URL
    urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
    if not urls or not all(isinstance(url, str) and url for url in urls):
        raise ValueError("base_url must be a URL or a non-empty sequence of URLs")
    if len(set(urls)) != len(urls):
        raise ValueError(f"base_url lists a server twice: {', '.join(urls)}")
    return urls


@functools.cache
def _constant_body() -> dict[str, Any]:
    """The part of every extraction request that never changes, built once (generating the schema
    costs ~1 ms). Shared by all requests: never mutate it."""
    schema = {"name": "EndpointExtraction", "schema": EndpointExtraction.model_json_schema(), "strict": True}
    return {
        "response_format": {"type": "json_schema", "json_schema": schema},
        "chat_template_kwargs": {"enable_thinking": False},
    }


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a string, not {type(text).__name__}")
    if not text.strip():
        raise InvalidInputError("text is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        found = text[exc.start : exc.end]
        raise InvalidInputError(
            f"text holds a lone surrogate ({found!a}) at character {exc.start}: it is not valid Unicode"
        ) from None
    return text


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def _retry_after(exc: BaseException | None) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    value = exc.response.headers.get("retry-after")
    try:
        return min(float(value), BACKOFF_MAX * 3) if value is not None else None
    except ValueError:
        return None


class _Wait:
    """Jittered exponential backoff, but never shorter than the server's Retry-After; no wait when
    an up server this call has not tried is there to fail over to."""

    def __init__(self, pool: _Pool, tried: set[int]) -> None:
        self._backoff = wait_random_exponential(multiplier=BACKOFF_INITIAL, max=BACKOFF_MAX)
        self._pool, self._tried = pool, tried

    def __call__(self, state: RetryCallState) -> float:
        if self._pool.untried_up(self._tried):
            return 0.0
        backoff = self._backoff(state)
        hint = _retry_after(state.outcome.exception() if state.outcome else None)
        return max(backoff, hint) if hint is not None else backoff


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return exc.message


def _response_body(exc: openai.APIStatusError) -> Any:
    """The error body as the server sent it (the SDK's ``exc.body`` drops its "error" wrapper)."""
    try:
        return exc.response.json()
    except ValueError:
        return exc.response.text or None


def _translate(exc: BaseException, attempts: int, servers: int = 1, tried: int = 1) -> EndpointError:
    # With several servers, the last one tried is named.
    said, reached, lead = "server", "the server", ""
    if servers > 1 and isinstance(exc, openai.APIError):
        url = exc.request.url
        said = reached = f"the last ({url.scheme}://{url.netloc.decode()})"
        lead = f"all {servers} servers tried and failed; "
        if tried < servers:
            lead = f"{tried} of {servers} servers tried and failed, the others cooling down after failures; "
    if isinstance(exc, openai.APIStatusError):
        message = _server_message(exc)
        if _retryable(exc):
            return ServerUnavailableError(
                f"{lead}{said} answered {exc.status_code} after {attempts} attempts: {message}",
                attempts=attempts,
                status_code=exc.status_code,
            )
        cls = AuthenticationError if exc.status_code == 401 else RequestRejectedError
        return cls(message, status_code=exc.status_code, body=_response_body(exc))
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return ServerUnavailableError(
            f"{lead}cannot reach {reached} after {attempts} attempts: {type(cause).__name__}: {cause}",
            attempts=attempts,
        )
    if isinstance(exc, EndpointError):
        return exc
    return EndpointError(f"{type(exc).__name__}: {exc}")


class _BaseClient:
    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_connections: int = 64,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        grounding: bool = False,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self._options = _Options(
            base_urls=_base_urls(base_url),
            api_key=api_key or os.environ.get(API_KEY_ENV) or "EMPTY",
            model=model,
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
            max_retries=max_retries,
            max_tokens=max_tokens,
            max_connections=max_connections,
            transport=transport,
            grounding=grounding,
        )
        self.usage = Usage()
        self._usage_lock = threading.Lock()
        self._pool = _Pool(self._options.base_urls)

    @property
    def base_url(self) -> str:
        """The first server's URL (the only one, for a client of one server)."""
        return self._options.base_urls[0]

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every server this client spreads its requests over."""
        return self._options.base_urls

    @property
    def model(self) -> str:
        return self._options.model

    def with_options(
        self: _Self,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        max_tokens: int | None = None,
    ) -> _Self:
        """A new client with some options changed; this one is left as it is."""
        o = self._options
        return type(self)(
            o.base_urls,
            api_key=o.api_key,
            model=o.model,
            timeout=o.timeout if timeout is None else timeout,
            max_retries=o.max_retries if max_retries is None else max_retries,
            max_tokens=o.max_tokens if max_tokens is None else max_tokens,
            max_connections=o.max_connections,
            transport=o.transport,
            grounding=o.grounding,
        )

    def _checked(self, index: int, text: str, value: EndpointExtraction) -> ExtractionResult:
        warnings = tuple(check_grounding(text, value)) if self._options.grounding else ()
        return ExtractionResult(index, value=value, warnings=warnings)

    def _request(self, text: str, max_tokens: int) -> dict[str, Any]:
        """The JSON body of one extraction request."""
        return {
            "model": self._options.model,
            "messages": build_messages(text),
            "temperature": 0.0,
            "max_tokens": max_tokens,
            **_constant_body(),
        }

    def _record(self, completion: ChatCompletion) -> None:
        usage = completion.usage
        self._add_usage(usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    def _add_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._usage_lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += prompt_tokens
            self.usage.completion_tokens += completion_tokens

    def _record_raw(self, body: object) -> None:
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            usage = {}
        self._add_usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))

    def _retry_kwargs(self, tried: set[int]) -> dict[str, Any]:
        """One call's retry policy: ``max_retries`` retries, and beyond them every server once
        (at most one more attempt per server, whatever the others' cool-downs)."""
        n = len(self._pool.servers)
        retries = stop_after_attempt(self._options.max_retries + 1)
        cap = stop_after_attempt(self._options.max_retries + n)
        return {
            "stop": lambda state: retries(state) and (len(tried) == n or cap(state)),
            "wait": _Wait(self._pool, tried),
            "retry": retry_if_exception(_retryable),
            "reraise": False,
        }

    def _fail(self, exc: BaseException, attempts: int, tried: set[int]) -> EndpointError:
        return _translate(exc, attempts, len(self._pool.servers), len(tried))

    @staticmethod
    def _parse(completion: ChatCompletion) -> EndpointExtraction | str:
        """The extraction, or the raw text when the answer was cut at max_tokens."""
        if not completion.choices:
            raise InvalidOutputError("server returned no choices", raw="")
        choice = completion.choices[0]
        raw = choice.message.content or ""
        if choice.finish_reason == "length":
            return raw
        try:
            return EndpointExtraction.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "answer"
            raise InvalidOutputError(
                f"answer is not endpoint JSON: {where}: {first['msg']}", raw=raw
            ) from None

    def _truncated(self, raw: str, max_tokens: int) -> OutputTruncatedError:
        return OutputTruncatedError(
            f"answer cut at max_tokens={max_tokens} ({len(raw)} characters so far)",
            raw=raw,
            max_tokens=max_tokens,
        )

    def _budgets(self) -> list[int]:
        first = self._options.max_tokens
        return [first, max(first * 2, RETRY_MAX_TOKENS)]


class EndpointClient(_BaseClient):
    """Blocking client. ``with EndpointClient(url) as client: client.extract(text)``.

    ``EndpointClient([url1, url2, ...])`` spreads the requests over several servers, with fail-over.

    ``grounding=True`` makes ``extract_many`` attach grounding warnings (``client.grounding``) to
    each result; for one text, call ``check_grounding(text, client.extract(text))``."""

    def __init__(self, base_url: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        o = self._options
        if o.transport is not None and not isinstance(o.transport, httpx.BaseTransport):
            raise TypeError("EndpointClient needs a sync httpx transport")
        self._http = httpx.Client(
            transport=o.transport,
            timeout=o.timeout,
            limits=httpx.Limits(
                max_connections=o.max_connections, max_keepalive_connections=o.max_connections
            ),
        )
        # One SDK client per server, all on one connection pool. The SDK is typed against its
        # httpx2 fork but takes httpx clients and timeouts as they are.
        self._sdks = [
            openai.OpenAI(
                base_url=url,
                api_key=o.api_key,
                timeout=o.timeout,  # type: ignore[arg-type]
                max_retries=0,
                http_client=self._http,  # type: ignore[arg-type]
            )
            for url in o.base_urls
        ]

    def _call(self, fn: Callable[[openai.OpenAI], _T]) -> _T:
        """``fn(server)`` under the one retry layer; failures come out as EndpointError."""
        attempts = 0
        tried: set[int] = set()
        try:
            for attempt in Retrying(**self._retry_kwargs(tried)):
                with attempt, self._pool.use(tried) as server:
                    attempts += 1
                    result = fn(self._sdks[server.index])
        except RetryError as exc:
            raise self._fail(exc.last_attempt.exception() or exc, attempts, tried) from None
        except openai.OpenAIError as exc:
            raise self._fail(exc, attempts, tried) from None
        return result

    def _create(self, text: str, max_tokens: int) -> ChatCompletion:
        request = self._request(text, max_tokens)
        completion = self._call(lambda sdk: sdk.post(_CHAT_PATH, body=request, cast_to=ChatCompletion))
        self._record(completion)
        return completion

    def served_models(self) -> list[str]:
        """The model names the server serves (``GET /models``; with several, the one asked)."""
        page = self._call(lambda sdk: sdk.models.list())
        return [model.id for model in page.data]

    def extract(self, text: str) -> EndpointExtraction:
        """Extract the endpoints of one text. Raises an EndpointError subclass on failure."""
        text = _check_text(text)
        budgets = self._budgets()
        raw = ""
        for max_tokens in budgets:
            parsed = self._parse(self._create(text, max_tokens))
            if isinstance(parsed, EndpointExtraction):
                return parsed
            raw = parsed
        raise self._truncated(raw, budgets[-1])

    def extract_many(self, texts: Iterable[str], *, concurrency: int = 8) -> list[ExtractionResult]:
        """Extract every text with up to ``concurrency`` requests in flight. Results come back in
        input order, each a value or an error: one failure never stops the others."""
        items = list(texts)
        _check_concurrency(concurrency, self._options.max_connections)

        def one(index: int) -> ExtractionResult:
            try:
                return self._checked(index, items[index], self.extract(items[index]))
            except EndpointError as exc:
                return ExtractionResult(index, error=exc)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, range(len(items))))

    def close(self) -> None:
        self._http.close()  # the SDK clients' one connection pool

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEndpointClient(_BaseClient):
    """Async client with the same methods as EndpointClient, as coroutines."""

    def __init__(self, base_url: str | Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        o = self._options
        if o.transport is not None and not isinstance(o.transport, httpx.AsyncBaseTransport):
            raise TypeError("AsyncEndpointClient needs an async httpx transport")
        self._http = httpx.AsyncClient(
            transport=o.transport,
            timeout=o.timeout,
            limits=httpx.Limits(
                max_connections=o.max_connections, max_keepalive_connections=o.max_connections
            ),
        )
        self._sdks = [
            openai.AsyncOpenAI(
                base_url=url,
                api_key=o.api_key,
                timeout=o.timeout,  # type: ignore[arg-type]
                max_retries=0,
                http_client=self._http,  # type: ignore[arg-type]
            )
            for url in o.base_urls
        ]

    async def _call(self, fn: Callable[[openai.AsyncOpenAI], Awaitable[_T]]) -> _T:
        """``await fn(server)`` under the one retry layer; failures come out as EndpointError."""
        attempts = 0
        tried: set[int] = set()
        try:
            async for attempt in AsyncRetrying(**self._retry_kwargs(tried)):
                with attempt, self._pool.use(tried) as server:
                    attempts += 1
                    result = await fn(self._sdks[server.index])
        except RetryError as exc:
            raise self._fail(exc.last_attempt.exception() or exc, attempts, tried) from None
        except openai.OpenAIError as exc:
            raise self._fail(exc, attempts, tried) from None
        return result

    async def _create(self, text: str, max_tokens: int) -> ChatCompletion:
        request = self._request(text, max_tokens)
        completion = await self._call(lambda sdk: sdk.post(_CHAT_PATH, body=request, cast_to=ChatCompletion))
        self._record(completion)
        return completion

    async def served_models(self) -> list[str]:
        page = await self._call(lambda sdk: sdk.models.list())
        return [model.id for model in page.data]

    async def _post_chat(self, body: dict[str, Any]) -> tuple[httpx.Response, Any]:
        """POST a chat completion body exactly as given (the OpenAI Batch API pass-through), under
        the same retry layer; returns the HTTP response and its JSON body."""
        response = await self._call(lambda sdk: sdk.post(_CHAT_PATH, body=body, cast_to=httpx.Response))
        try:
            payload = response.json()
        except ValueError:
            raise InvalidOutputError(
                "server answered with a body that is not JSON", raw=response.text
            ) from None
        self._record_raw(payload)
        return response, payload

    async def extract(self, text: str) -> EndpointExtraction:
        text = _check_text(text)
        budgets = self._budgets()
        raw = ""
        for max_tokens in budgets:
            parsed = self._parse(await self._create(text, max_tokens))
            if isinstance(parsed, EndpointExtraction):
                return parsed
            raw = parsed
        raise self._truncated(raw, budgets[-1])

    async def extract_many(self, texts: Iterable[str], *, concurrency: int = 8) -> list[ExtractionResult]:
        items = list(texts)
        _check_concurrency(concurrency, self._options.max_connections)
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> ExtractionResult:
            async with gate:
                try:
                    return self._checked(index, items[index], await self.extract(items[index]))
                except EndpointError as exc:
                    return ExtractionResult(index, error=exc)

        return list(await asyncio.gather(*(one(i) for i in range(len(items)))))

    async def close(self) -> None:
        await self._http.aclose()  # the SDK clients' one connection pool

    async def __aenter__(self) -> AsyncEndpointClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _check_concurrency(concurrency: int, pool: int) -> None:
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if concurrency > pool:
        raise ValueError(
            f"concurrency {concurrency} exceeds the connection pool ({pool}); "
            f"create the client with max_connections>={concurrency}"
        )


__all__: Sequence[str] = ("AsyncEndpointClient", "EndpointClient", "ExtractionResult", "Usage")

"""EndpointClient and AsyncEndpointClient: the same methods, one blocking, one async.

What an extraction sends and how its answer is read are here, once, in ``_Extractor``; the twins
differ only in how they wait. The transport under both (servers, retries, error translation) is
``client._base_client``'s.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

from client._base_client import Usage, _AsyncAPIClient, _BaseClient, _SyncAPIClient, _unexpected
from client._constants import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_RETRIES, DEFAULT_MAX_TOKENS, DEFAULT_MODEL
from client._exceptions import EndpointError, InvalidInputError, InvalidOutputError, OutputTruncatedError
from client._options import _check_text
from client.grounding import GroundingWarning, check_grounding
from client.models import EndpointExtraction
from client.prompt import build_messages

_T = TypeVar("_T")


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


@functools.cache
def _constant_body() -> dict[str, Any]:
    """The part of every extraction request that never changes, built once (generating the schema
    costs ~1 ms). Shared by all requests: never mutate it."""
    schema = {"name": "EndpointExtraction", "schema": EndpointExtraction.model_json_schema(), "strict": True}
    return {
        "response_format": {"type": "json_schema", "json_schema": schema},
        "chat_template_kwargs": {"enable_thinking": False},
    }


class _Extractor(_BaseClient):
    """What both twins send and how they read the answers, whatever the transport."""

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


class EndpointClient(_Extractor, _SyncAPIClient):
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


class AsyncEndpointClient(_Extractor, _AsyncAPIClient):
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

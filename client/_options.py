"""A client's options, checked once when they are given: in the constructor or ``with_options``."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from client._constants import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, DEFAULT_TIMEOUT
from client._exceptions import InvalidInputError

# httpx's own default, which a given http_client has unless its owner chose a timeout.
_HTTPX_DEFAULT_TIMEOUT = httpx.Timeout(5.0)


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

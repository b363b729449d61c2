"""One error hierarchy: everything the client raises derives from EndpointError.

Shaped after openai-python's: every error carries ``status_code``, ``request_id``, ``response`` and
``body`` (None where there was no response), and the exception it was translated from as
``__cause__``; rate limits and timeouts have their own types (``RateLimitError``,
``APITimeoutError``), both under ``ServerUnavailableError`` because both are retried first.
"""

from __future__ import annotations

import httpx

REQUEST_ID_HEADER = "x-request-id"


class EndpointError(Exception):
    """Base of every error this client raises.

    ``status_code``, ``request_id`` (the server's ``x-request-id``), ``response`` and ``body`` (the
    error body as the server sent it: decoded JSON, else the text) are set where a response came
    back, None otherwise."""

    status_code: int | None
    request_id: str | None
    response: httpx.Response | None
    body: object | None

    def __init__(
        self, message: str, *, response: httpx.Response | None = None, body: object | None = None
    ) -> None:
        super().__init__(message)
        self.response = response
        self.body = body
        self.status_code = response.status_code if response is not None else None
        self.request_id = response.headers.get(REQUEST_ID_HEADER) if response is not None else None


class InvalidInputError(EndpointError, ValueError):
    """The text cannot be sent (empty, whitespace only, not a string), or an argument of the call is
    wrong. Nothing was sent."""


class ClientClosedError(EndpointError):
    """The client (or the client it was made from with ``with_options``) was closed."""


class ServerUnavailableError(EndpointError):
    """The server could not be reached, or kept failing (5xx, 408, 409) through every retry.

    ``server_down`` says whether this looks like an outage rather than a problem of this one
    request: every attempt found the connection refused or failed, or an answer of 502/503/504."""

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        response: httpx.Response | None = None,
        body: object | None = None,
        server_down: bool = False,
    ) -> None:
        super().__init__(message, response=response, body=body)
        self.attempts = attempts
        self._server_down = server_down

    @property
    def server_down(self) -> bool:
        """No server could be reached, or each said it cannot serve now (502/503/504): nothing
        about the request itself. A bulk job stops on it rather than fail every record after it.
        False for a timeout, a 429 or a 500: those are this request's failure."""
        return self._server_down


class APITimeoutError(ServerUnavailableError):
    """The request timed out (connect, read, write or waiting for a pooled connection) through
    every retry. ``server_down`` is False: the server was there, this request was slow."""


class RateLimitError(ServerUnavailableError):
    """429 through every retry (or a Retry-After longer than the client waits). ``server_down``
    is False."""


class RequestRejectedError(EndpointError):
    """The server refused the request (4xx); ``message`` is the server's own explanation."""

    status_code: int

    def __init__(self, message: str, *, response: httpx.Response, body: object | None = None) -> None:
        super().__init__(f"{response.status_code}: {message}", response=response, body=body)
        self.message = message


class AuthenticationError(RequestRejectedError):
    """401: missing or wrong API key."""


class OutputTruncatedError(EndpointError):
    """The answer hit max_tokens (the server's cap unless the client was given less; then
    ``max_tokens`` is None); ``raw`` holds the text so far."""

    def __init__(
        self, message: str, *, raw: str, max_tokens: int | None, response: httpx.Response | None = None
    ) -> None:
        super().__init__(message, response=response)
        self.raw = raw
        self.max_tokens = max_tokens


class InvalidOutputError(EndpointError):
    """A 2xx answer that is not what was asked for: not JSON, no choices, no message text, or text
    that is not valid endpoint JSON (should not happen when the server enforces the schema).
    ``raw`` holds the text as received; ``body`` the decoded answer where it was JSON."""

    def __init__(
        self, message: str, *, raw: str, response: httpx.Response | None = None, body: object | None = None
    ) -> None:
        super().__init__(message, response=response, body=body)
        self.raw = raw


class BatchError(EndpointError):
    """A bulk job cannot start or go on: a bad INPUT or OUTPUT file, or a bad argument. The message
    is one line that names the file and says what to do."""

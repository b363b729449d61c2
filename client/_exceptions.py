"""One error hierarchy: everything the client raises derives from EndpointError."""

from __future__ import annotations

from typing import Any


class EndpointError(Exception):
    """Base of every error this client raises."""


class InvalidInputError(EndpointError, ValueError):
    """The text cannot be sent (empty, whitespace only, not a string). Nothing was sent."""


class ServerUnavailableError(EndpointError):
    """The server could not be reached, timed out, or kept failing (5xx, 429) through every retry."""

    def __init__(self, message: str, *, attempts: int, status_code: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status_code = status_code

    @property
    def server_down(self) -> bool:
        """No server could be reached, or each said it cannot serve now (502/503/504): nothing
        about the request itself. A bulk job stops on it rather than fail every record after it."""
        return self.status_code in (None, 502, 503, 504)


class RequestRejectedError(EndpointError):
    """The server refused the request (4xx); ``message`` is the server's own explanation."""

    def __init__(self, message: str, *, status_code: int, body: Any = None) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.body = body


class AuthenticationError(RequestRejectedError):
    """401: missing or wrong API key."""


class OutputTruncatedError(EndpointError):
    """The answer hit max_tokens even after the one retry with a larger budget."""

    def __init__(self, message: str, *, raw: str, max_tokens: int) -> None:
        super().__init__(message)
        self.raw = raw
        self.max_tokens = max_tokens


class InvalidOutputError(EndpointError):
    """The answer is not valid endpoint JSON (should not happen when the server enforces the
    schema); ``raw`` holds the text as received."""

    def __init__(self, message: str, *, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class BatchError(EndpointError):
    """A bulk job cannot start or go on: a bad INPUT or OUTPUT file, or a bad argument. The message
    is one line that names the file and says what to do."""

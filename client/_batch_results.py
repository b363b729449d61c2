"""What a bulk job writes for one record (``client/batch.py``): the error fields of a failed
record, and the OpenAI Batch API's output lines, the request sent through as it is."""

from __future__ import annotations

import uuid
from typing import Any

from client._batch_input import Record
from client._client import AsyncEndpointClient
from client._exceptions import (
    APITimeoutError,
    AuthenticationError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RateLimitError,
    RequestRejectedError,
    ServerUnavailableError,
)

# The most specific class in an error's MRO names its code.
_ERROR_CODES: dict[type[EndpointError], str] = {
    InvalidInputError: "invalid_request",
    AuthenticationError: "authentication_error",
    RequestRejectedError: "request_rejected",
    RateLimitError: "rate_limit_exceeded",
    APITimeoutError: "timeout",
    ServerUnavailableError: "server_unavailable",
    OutputTruncatedError: "output_truncated",
    InvalidOutputError: "invalid_output",
}


def _error_json(exc: EndpointError) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for name in ("status_code", "request_id", "raw"):
        value = getattr(exc, name, None)
        if value is not None:
            out[name] = value
    return out


def _error_code(exc: EndpointError) -> str:
    return next((_ERROR_CODES[cls] for cls in type(exc).__mro__ if cls in _ERROR_CODES), "error")


def _batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def _openai_failure(record: Record, exc: EndpointError) -> dict[str, Any]:
    """The Batch API's line for a request that failed; ``response`` where the server answered."""
    response = None
    if exc.status_code is not None:
        response = {"status_code": exc.status_code, "request_id": exc.request_id, "body": exc.body}
    error = {"code": _error_code(exc), "message": str(exc)}
    return {"id": _batch_id(), "custom_id": record.id, "response": response, "error": error}


def _completion_problem(payload: object) -> str | None:
    """Why a 2xx body is not a chat completion; None when it is one. Only the shape every reader of
    the Batch output relies on is checked: the body goes to OUTPUT as the server sent it."""
    if not isinstance(payload, dict):
        return f"the answer is JSON {type(payload).__name__}, not a chat completion object"
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        return "the answer has no choices"
    for index, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return f"the answer's choice {index} has no message"
    return None


async def _openai_call(client: AsyncEndpointClient, record: Record) -> dict[str, Any]:
    """One OpenAI Batch request, sent as it is; the line the Batch API writes for it. A 2xx that
    is not a chat completion raises InvalidOutputError."""
    assert record.body is not None
    http, payload = await client._post_chat(record.body)
    problem = _completion_problem(payload)
    if problem is not None:
        raise InvalidOutputError(problem, raw=http.text, response=http, body=payload)
    response = {
        "status_code": http.status_code,
        "request_id": http.headers.get("x-request-id"),
        "body": payload,
    }
    return {"id": _batch_id(), "custom_id": record.id, "response": response, "error": None}

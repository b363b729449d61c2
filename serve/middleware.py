"""ASGI middleware that vLLM loads with ``--middleware serve.middleware.SchemaPolicyMiddleware``.

It applies the schema policy and the request limits to generation requests before vLLM sees them.
vLLM instantiates middleware without arguments, so the policy comes from ENDPOINT_* variables that
``python -m serve`` sets for the server process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from client.models import endpoint_json_schema

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Under `force` these other generation routes would return unconstrained text, so they are closed.
UNCONSTRAINED_PATHS = ("/v1/responses", "/v1/messages", "/inference/v1/generate", "/v1/audio")


class PolicyError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def schema_response_format() -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "EndpointExtraction", "schema": endpoint_json_schema(), "strict": True},
    }


def _brings_format(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return (fmt is not None) or body.get("structured_outputs") is not None


def _is_endpoint_format(body: dict[str, Any]) -> bool:
    """Whether the format a request brings is exactly the endpoint schema (in either spelling)."""
    ours = endpoint_json_schema()
    fmt = body.get("response_format")
    if fmt is not None:
        schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        if fmt.get("type") != "json_schema" or schema != ours:
            return False
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict) or set(k for k, v in so.items() if v is not None) - {"json"}:
            return False
        json_value = so.get("json")
        if isinstance(json_value, str):
            try:
                json_value = json.loads(json_value)
            except ValueError:
                return False
        if json_value != ours:
            return False
    return True


@dataclass(frozen=True)
class Policy:
    mode: str = "default"
    model: str = "endpoint-extractor"
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1_000_000

    @classmethod
    def from_env(cls) -> Policy:
        env = os.environ
        return cls(
            mode=env.get("ENDPOINT_SCHEMA_POLICY", "default"),
            model=env.get("ENDPOINT_SERVED_MODEL_NAME", "endpoint-extractor"),
            max_tokens_cap=int(env.get("ENDPOINT_MAX_TOKENS_CAP", "1024")),
            max_body_bytes=int(env.get("ENDPOINT_MAX_BODY_BYTES", "1000000")),
        )

    def apply(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request as vLLM should see it, or a PolicyError."""
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_tokens_cap:
                raise PolicyError(
                    400, f"{key}={value} exceeds this server's cap of {self.max_tokens_cap}", key
                )
        if self.mode == "off" or body.get("model", self.model) != self.model:
            return body
        if path == COMPLETIONS_PATH:
            if self.mode == "force":
                return self._forced(body, completions=True)
            return body
        if self.mode == "force":
            return self._forced(body, completions=False)
        if not _brings_format(body):
            return {**body, "response_format": schema_response_format()}
        return body

    def _forced(self, body: dict[str, Any], *, completions: bool) -> dict[str, Any]:
        if _brings_format(body) and not _is_endpoint_format(body):
            raise PolicyError(
                400,
                "this server's schema policy is 'force': it returns endpoint JSON only; "
                "drop response_format/structured_outputs or send the endpoint schema",
                "response_format",
            )
        body = {k: v for k, v in body.items() if k not in ("response_format", "structured_outputs")}
        if completions:
            return {**body, "structured_outputs": {"json": endpoint_json_schema()}}
        return {**body, "response_format": schema_response_format()}


async def _send_error(send: Send, status: int, message: str, param: str | None = None) -> None:
    kind = {400: "BadRequestError", 403: "PermissionDeniedError", 413: "RequestTooLargeError"}
    payload = json.dumps(
        {"error": {"message": message, "type": kind.get(status, "Error"), "param": param, "code": status}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class SchemaPolicyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.policy = Policy.from_env()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.policy.mode == "force" and path.startswith(UNCONSTRAINED_PATHS):
            return await _send_error(send, 403, f"{path} is closed: this server's schema policy is 'force'")
        if path not in (CHAT_PATH, COMPLETIONS_PATH):
            return await self.app(scope, receive, send)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.policy.max_body_bytes:
            return await _send_error(send, 413, self._too_large())
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.policy.max_body_bytes:
                return await _send_error(send, 413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)

        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # vLLM answers malformed JSON with its own 400
        if isinstance(body, dict):
            try:
                new_body = self.policy.apply(path, body)
            except PolicyError as exc:
                return await _send_error(send, exc.status, exc.message, exc.param)
            if new_body is not body:
                raw = json.dumps(new_body).encode()

        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)

    def _too_large(self) -> str:
        return f"request body exceeds this server's limit of {self.policy.max_body_bytes} bytes"

"""ASGI middleware that vLLM loads with ``--middleware serve.middleware.SchemaPolicyMiddleware``.

It sits in front of vLLM's own middleware and routes (Starlette puts the last one added outermost)
and, for every request:

* gives it an ``X-Request-Id`` when it has none, so the id vLLM echoes (``--enable-request-id-headers``)
  is also the one its engine and logs use, and logs one line per POST with that id;
* refuses a missing or wrong API key (vLLM's ``VLLM_API_KEY``) before reading any body;
* caps the body size, the time the body may take to arrive, and ``max_tokens``; refuses a
  generation request whose body is not a JSON object of valid Unicode with a clear 400 (vLLM would
  answer some of those with a 500); and applies the schema policy to generation requests.

vLLM instantiates middleware without arguments, so the policy comes from ENDPOINT_* variables that
``python -m serve`` sets for the server process.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
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
CHAT_PATHS = (CHAT_PATH, "/v1/chat/completions/batch")
COMPLETIONS_PATH = "/v1/completions"
SAGEMAKER_PATH = "/invocations"  # vLLM routes it to chat or completions by the body's shape
GENERATION_PATHS = (*CHAT_PATHS, COMPLETIONS_PATH, SAGEMAKER_PATH)
# POST routes that generate nothing. Under `force` every other POST route would return text the
# policy does not constrain (/v1/responses, /v1/messages, /inference/v1/generate, /v1/systemone,
# audio, and whatever a later vLLM adds), so all of them are closed.
NON_GENERATING_PATHS = (
    "/tokenize",
    "/detokenize",
    "/ping",
    "/v1/chat/completions/render",
    "/v1/chat/completions/derender",
    "/v1/completions/render",
    "/v1/completions/derender",
    "/v1/messages/count_tokens",
)
# The prefixes vLLM's own API-key check guards (vllm/entrypoints/serve/middleware/authenticate.py).
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
HEALTH_PATHS = ("/health", "/ping")
TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
REQUEST_ID_HEADER = b"x-request-id"

# A child of vLLM's logger, so its lines come out in vLLM's format (text, or JSON with
# --log-format json, where the `extra` fields become keys).
logger = logging.getLogger("vllm.endpoint_extractor.access")


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class _BodyStalled(Exception):
    """The request body did not arrive within the body timeout."""


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


def _kind(path: str, body: dict[str, Any]) -> str | None:
    """'chat', 'completions', or None for a request the policy does not constrain."""
    if path in CHAT_PATHS:
        return "chat"
    if path == COMPLETIONS_PATH:
        return "completions"
    if path == SAGEMAKER_PATH:
        return "chat" if "messages" in body else "completions" if "prompt" in body else None
    return None


@dataclass(frozen=True)
class Policy:
    mode: str = "default"
    model: str = "endpoint-extractor"
    max_tokens_cap: int = 1024
    max_body_bytes: int = 1_000_000
    body_timeout: float = 30.0

    @classmethod
    def from_env(cls) -> Policy:
        env = os.environ
        return cls(
            mode=env.get("ENDPOINT_SCHEMA_POLICY", "default"),
            model=env.get("ENDPOINT_SERVED_MODEL_NAME", "endpoint-extractor"),
            max_tokens_cap=int(env.get("ENDPOINT_MAX_TOKENS_CAP", "1024")),
            max_body_bytes=int(env.get("ENDPOINT_MAX_BODY_BYTES", "1000000")),
            body_timeout=float(env.get("ENDPOINT_BODY_TIMEOUT", "30")),
        )

    def route_open(self, path: str) -> bool:
        """Whether a POST to ``path`` may proceed at all under this policy."""
        if self.mode != "force":
            return True
        return path in (*GENERATION_PATHS, *NON_GENERATING_PATHS)

    def apply(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request as vLLM should see it, or a PolicyError."""
        return self.decide(path, body)[0]

    def decide(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The request as vLLM should see it and what the policy did (for the log)."""
        self._check_token_limits(body)
        kind = _kind(path, body)
        if self.mode == "off" or path in NON_GENERATING_PATHS:
            return body, "none"
        if self.mode == "force":
            if kind is None:
                raise PolicyError(
                    400, "this server's schema policy is 'force': send a chat or completions request"
                )
            if body.get("tools"):
                raise PolicyError(
                    400,
                    "this server's schema policy is 'force': tools are not accepted, the answer is endpoint JSON",
                    "tools",
                )
            if _brings_format(body) and not _is_endpoint_format(body):
                raise PolicyError(
                    400,
                    "this server's schema policy is 'force': it returns endpoint JSON only; "
                    "drop response_format/structured_outputs or send the endpoint schema",
                    "response_format",
                )
            body = {k: v for k, v in body.items() if k not in ("response_format", "structured_outputs")}
            if kind == "completions":
                return {**body, "structured_outputs": {"json": endpoint_json_schema()}}, "forced"
            return {**body, "response_format": schema_response_format()}, "forced"
        if _brings_format(body):
            return body, "kept"
        if kind == "chat" and (body.get("model") or self.model) == self.model:
            return {**body, "response_format": schema_response_format()}, "injected"
        return body, "none"

    def _check_token_limits(self, body: dict[str, Any]) -> None:
        sampling = body.get("sampling_params")  # /inference/v1/generate
        for where in (body, sampling if isinstance(sampling, dict) else {}):
            for key in TOKEN_LIMIT_KEYS:
                value = where.get(key)
                if isinstance(value, bool):  # pydantic would take `true` for 1
                    raise PolicyError(400, f"{key} must be a whole number, not {json.dumps(value)}", key)
                if isinstance(value, int) and value > self.max_tokens_cap:
                    raise PolicyError(
                        400, f"{key}={value} exceeds this server's cap of {self.max_tokens_cap}", key
                    )


async def _reply_error(send: Send, status: int, message: str, param: str | None, request_id: str) -> None:
    kind = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        408: "RequestTimeoutError",
        413: "RequestTooLargeError",
        503: "ServiceUnavailableError",
    }
    error = {"message": message, "type": kind.get(status, "Error"), "param": param, "code": status}
    payload = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (REQUEST_ID_HEADER, request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class SchemaPolicyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.policy = Policy.from_env()
        self._drain_flag = os.environ.get("ENDPOINT_DRAIN_FLAG")
        key = os.environ.get("VLLM_API_KEY")
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        request_id = dict(headers).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        if not request_id:
            request_id = uuid.uuid4().hex
            headers.append((REQUEST_ID_HEADER, request_id.encode()))
        scope = {**scope, "headers": headers}
        path = scope.get("path", "")
        # python -m serve got SIGTERM: vLLM finishes what it has and takes nothing new. Readiness
        # turns red, and new work gets a retryable 503 instead of vLLM's 500.
        draining = bool(self._drain_flag) and os.path.exists(self._drain_flag or "")
        if draining and (path in HEALTH_PATHS or scope.get("method") == "POST"):
            return await _reply_error(send, 503, "server is shutting down; retry elsewhere", None, request_id)
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)

        started = time.perf_counter()
        status = 0
        action = "none"

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        async def reply_error(error_status: int, message: str, param: str | None = None) -> None:
            await _reply_error(send_logged, error_status, message, param, request_id)

        try:
            if not self._authorized(path, headers):
                action = "rejected"
                return await reply_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
            if not self.policy.route_open(path):
                action = "rejected"
                return await reply_error(403, f"{path} is closed: this server's schema policy is 'force'")
            try:
                raw = await self._read_body(receive, headers)
            except _ClientGone:
                action = "disconnected"
                return None
            except _BodyStalled:
                action = "rejected"
                return await reply_error(
                    408, f"request body not received within {self.policy.body_timeout:g} s; send it whole"
                )
            if raw is None:
                action = "rejected"
                return await reply_error(
                    413, f"request body exceeds this server's limit of {self.policy.max_body_bytes} bytes"
                )
            body, problem = _json_body(raw)
            if problem is not None and path in GENERATION_PATHS:
                # Other routes (multipart audio uploads, say) may carry bodies that are not JSON.
                action = "rejected"
                return await reply_error(400, problem)
            if isinstance(body, dict):
                try:
                    new_body, action = self.policy.decide(path, body)
                except PolicyError as exc:
                    action = "rejected"
                    return await reply_error(exc.status, exc.message, exc.param)
                if new_body is not body:
                    raw = json.dumps(new_body).encode()
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"content-length", str(len(raw)).encode()))
            await self.app({**scope, "headers": headers}, _replay(raw, receive), send_logged)
        finally:
            elapsed_ms = round((time.perf_counter() - started) * 1000)
            logger.info(
                "POST %s %s request_id=%s schema=%s %dms",
                path,
                status,
                request_id,
                action,
                elapsed_ms,
                extra={
                    "request_id": request_id,
                    "path": path,
                    "status": status,
                    "schema_policy": action,
                    "duration_ms": elapsed_ms,
                },
            )

    def _authorized(self, path: str, headers: list[tuple[bytes, bytes]]) -> bool:
        # vLLM checks the key too, but only after this middleware; checking here first means no
        # body of an unauthenticated request is read or judged.
        if self._key_digest is None or not path.startswith(GUARDED_PREFIXES):
            return True
        scheme, _, token = dict(headers).get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._key_digest)

    async def _read_body(self, receive: Receive, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The whole body, or None when it is over the limit (by its declared length or as read).
        A client that stalls mid-body would otherwise hold its connection and this task forever."""
        limit = self.policy.max_body_bytes
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        deadline = asyncio.get_running_loop().time() + self.policy.body_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                raise _BodyStalled from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


_JSON_TYPES: dict[type, str] = {
    list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"
}  # fmt: skip


def _json_body(raw: bytes) -> tuple[Any, str | None]:
    """The parsed body, or why a generation request cannot have it: not UTF-8, not JSON, not an
    object, or a lone surrogate (escaped as ``\\ud800``) that no tokenizer can encode."""
    try:
        body = json.loads(raw.decode("utf-8"))  # strict: UTF-8-encoded surrogates are refused here
    except UnicodeDecodeError as exc:
        return None, f"request body is not valid UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if not isinstance(body, dict):
        return None, f"request body must be a JSON object, not {_JSON_TYPES[type(body)]}"
    if b"\\u" in raw:  # only an escape can make a lone surrogate now
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            found = exc.object[exc.start : exc.end]
            return None, f"request body holds a lone surrogate ({found!a}); send valid Unicode"
    return body, None


def _replay(raw: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay

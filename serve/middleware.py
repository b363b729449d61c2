"""ASGI middleware that vLLM loads with ``--middleware serve.middleware.SchemaPolicyMiddleware``.

It sits in front of vLLM's own middleware and routes (Starlette puts the last one added outermost)
and, for every request:

* gives it an ``X-Request-Id`` when it has none, so the id vLLM echoes (``--enable-request-id-headers``)
  is also the one its engine and logs use, and logs one line per POST with that id;
* with a key (vLLM's ``VLLM_API_KEY``), refuses every request without it, whatever its route,
  method or scope type, but GET/HEAD on ``OPEN_PATHS``, before reading any body; closes the
  admin, dev and docs routes (404) under every setting;
* caps the body size, the time the body may take to arrive, each sequence's ``max_tokens`` and the
  tokens one request may ask for in all (n x prompts x max_tokens); refuses a generation request
  whose body is not a JSON object of valid Unicode, or whose counts are not whole numbers, with a
  clear 400 (vLLM would answer some of those with a 500 or coerce them); and applies the schema
  policy to generation requests: where the endpoint schema applies, only parameters that keep the
  answer inside it are accepted.

vLLM instantiates middleware without arguments, so the policy comes from ENDPOINT_* variables that
``python -m serve`` sets for the server process.

The policy itself, what a request may ask for, is ``serve/policy.py``; this module is the ASGI
side: keys, closed routes, reading the body, request ids and the access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve.grammar import endpoint_grammar
from serve.policy import (
    ALLOWED_PARAMS,
    CHAT_PATH,
    CHAT_PATHS,
    COMMON_PARAMS,
    COMPLETIONS_PATH,
    COUNT_KEYS,
    FORMAT_KEYS,
    GENERATION_PATHS,
    NEUTRAL_VALUES,
    NON_GENERATING_PATHS,
    SAGEMAKER_PATH,
    TOKEN_LIMIT_KEYS,
    Policy,
    PolicyError,
    schema_response_format,
)

# Everything this module offers, the policy's names included: they were defined here before
# serve/policy.py held them, and stay importable from here.
__all__ = [
    "ALLOWED_PARAMS",
    "CHAT_PATH",
    "CHAT_PATHS",
    "CLOSED_PATHS",
    "CLOSED_PREFIXES",
    "COMMON_PARAMS",
    "COMPLETIONS_PATH",
    "COUNT_KEYS",
    "FORMAT_KEYS",
    "GENERATION_PATHS",
    "HEALTH_PATHS",
    "NEUTRAL_VALUES",
    "NON_GENERATING_PATHS",
    "OPEN_METHODS",
    "OPEN_PATHS",
    "REQUEST_ID_HEADER",
    "SAGEMAKER_PATH",
    "TOKEN_LIMIT_KEYS",
    "UNAUTHORIZED",
    "ASGIApp",
    "Message",
    "Policy",
    "PolicyError",
    "Receive",
    "SchemaPolicyMiddleware",
    "Scope",
    "Send",
    "logger",
    "route_path",
    "schema_response_format",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# With a key set, these alone answer without it, and only to GET/HEAD: liveness and readiness
# probes (Kubernetes, load balancers, SageMaker's /ping) and Prometheus scrapers carry no bearer
# token. /health and /ping say only up or down. /metrics reveals load and usage, not content:
# request counts and latencies, tokens processed, KV-cache use, the served model name and vLLM's
# configuration labels; keep it off the public side of a proxy if that matters.
OPEN_PATHS = ("/health", "/ping", "/metrics")
OPEN_METHODS = ("GET", "HEAD")
HEALTH_PATHS = ("/health", "/ping")
# Routes a deployment of this extractor never needs, closed (404) whether or not a key is set: the
# one key is shared by every client, so it cannot tell an operator from a client, and these act on
# the server itself. Interactive API docs; elastic expert-parallel scaling (no MoE here); vLLM's
# VLLM_SERVER_DEV_MODE routes (sleep, weights, collective RPC: arbitrary calls on the workers);
# the RL weight-sync routes; the profiler; runtime LoRA loading from a server path (vLLM's and
# SageMaker's); aborting other clients' requests by id; fault tolerance. Anything else, including
# whatever a later vLLM adds, still needs the key.
CLOSED_PATHS = frozenset({
    "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
    "/scale_elastic_ep", "/is_scaling_elastic_ep",
    "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/collective_rpc",
    "/server_info", "/sleep", "/wake_up", "/is_sleeping", "/release_kv_cache_memory",
    "/pause", "/resume", "/abort_requests", "/is_paused", "/init_weight_transfer_engine",
    "/shutdown_weight_transfer_engine", "/start_weight_update", "/start_draft_weight_update",
    "/update_weights", "/finish_weight_update", "/update_weight_version", "/weight_info",
    "/weight_checker", "/get_world_size", "/start_profile", "/stop_profile",
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/inference/v1/abort_requests",
})  # fmt: skip
CLOSED_PREFIXES = ("/static/", "/fault_tolerance/", "/adapters/")
REQUEST_ID_HEADER = b"x-request-id"
UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"

# A child of vLLM's logger, so its lines come out in vLLM's format (text, or JSON with
# --log-format json, where the `extra` fields become keys).
logger = logging.getLogger("vllm.endpoint_extractor.access")


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class _BodyStalled(Exception):
    """The request body did not arrive within the body timeout."""


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


def route_path(scope: Scope) -> str:
    """The path Starlette's router matches (``starlette._utils.get_route_path``, private there):
    the request path less the root path (--root-path) when it starts with it. The guard judges
    exactly what the router will route, so no spelling reaches a route the guard did not see."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


def _closed(path: str) -> bool:
    return path in CLOSED_PATHS or path.startswith(CLOSED_PREFIXES)


def _api_key_digest() -> bytes | None:
    key = os.environ.get("VLLM_API_KEY")
    if key is None:
        return None
    if not key.strip():
        # vLLM itself reads an empty VLLM_API_KEY as "no key": never switch the guard off that way.
        raise RuntimeError("VLLM_API_KEY is set but empty; set a key or unset the variable")
    return hashlib.sha256(key.encode()).digest()


class SchemaPolicyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.policy = Policy.from_env()
        if self.policy.compact_grammar:
            endpoint_grammar()  # built once at start-up (~0.1 s), not on the first request
        self._drain_flag = os.environ.get("ENDPOINT_DRAIN_FLAG")
        self._key_digest = _api_key_digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        path = route_path(scope)
        if scope["type"] == "websocket":
            if not self._authorized(path, "WEBSOCKET", headers) or _closed(path):
                # Closing before accepting makes the server answer the handshake with a 403.
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        request_id = dict(headers).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        if not request_id:
            request_id = uuid.uuid4().hex
            headers.append((REQUEST_ID_HEADER, request_id.encode()))
        scope = {**scope, "headers": headers}
        method = scope.get("method", "")
        # python -m serve got SIGTERM: vLLM finishes what it has and takes nothing new. Readiness
        # turns red, and new work gets a retryable 503 instead of vLLM's 500.
        draining = bool(self._drain_flag) and os.path.exists(self._drain_flag or "")
        if draining and path in HEALTH_PATHS:
            return await _reply_error(send, 503, "server is shutting down; retry elsewhere", None, request_id)
        if method != "POST":
            if not self._authorized(path, method, headers):
                await self._discard_body(receive, headers)
                return await _reply_error(send, 401, UNAUTHORIZED, None, request_id)
            if _closed(path):
                await self._discard_body(receive, headers)
                return await _reply_error(send, 404, f"{path} is not served here", None, request_id)
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

        async def refuse_unread(error_status: int, message: str) -> None:
            await self._discard_body(receive, headers)
            await reply_error(error_status, message)

        try:
            if not self._authorized(path, method, headers):
                action = "rejected"
                return await refuse_unread(401, UNAUTHORIZED)
            if _closed(path):
                action = "rejected"
                return await refuse_unread(404, f"{path} is not served here")
            if draining:
                return await refuse_unread(503, "server is shutting down; retry elsewhere")
            if not self.policy.route_open(path):
                action = "rejected"
                return await refuse_unread(403, f"{path} is closed: this server's schema policy is 'force'")
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

    def _authorized(self, path: str, method: str, headers: list[tuple[bytes, bytes]]) -> bool:
        # Default-deny: every route, method and scope needs the key but GET/HEAD on OPEN_PATHS.
        # vLLM checks the key too, but only after this middleware and only under /v1, /v2,
        # /inference and /cohere; checking here first means no body of an unauthenticated
        # request is read or judged.
        if self._key_digest is None or (path in OPEN_PATHS and method in OPEN_METHODS):
            return True
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = value.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode("latin-1")).digest(), self._key_digest)

    async def _discard_body(self, receive: Receive, headers: list[tuple[bytes, bytes]]) -> None:
        """Read and drop a refused request's body (within the size and time limits) before the
        answer. A server that answers and closes with body bytes unread makes the kernel reset the
        connection, and a proxy in front (the balancer of --engines) can lose the answer with it."""
        if not any(k in (b"content-length", b"transfer-encoding") for k, _ in headers):
            return
        with contextlib.suppress(_ClientGone, _BodyStalled):
            await self._read_body(receive, headers)

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

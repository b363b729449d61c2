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
from dataclasses import dataclass
from typing import Any

from client.models import endpoint_json_schema
from serve.grammar import compact_grammar_applies, endpoint_grammar, grammar_structured_outputs

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
TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
COUNT_KEYS = (*TOKEN_LIMIT_KEYS, "n", "best_of")
FORMAT_KEYS = ("response_format", "structured_outputs")
# Where the endpoint schema applies, the only parameters accepted: each leaves vLLM's grammar in
# force from the first generated token to the last and returns nothing but the generated text (and,
# for logprobs, scores vLLM computes after the grammar mask: sample_tokens applies the bitmask to
# the logits before the sampler computes logprobs, so every alternative outside the grammar has
# -inf). Everything else is refused by name, new vLLM parameters included. Refused on purpose:
# use_beam_search (vLLM drops the grammar for beam search), echo and prompt_logprobs (prompt text
# and the unconstrained model's choices), suffix, stop* (cut the JSON), chat_template*,
# reasoning_effort, continue_final_message/add_generation_prompt (the prompt's shape), logit_bias,
# allowed_token_ids, bad_words, min_tokens, ignore_eos, vllm_xargs (custom logits processors run
# after the mask), tools, kv_transfer_params, prompt_embeds, priority, cache_salt.
COMMON_PARAMS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stream",
    "stream_options", "user", "request_id", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", *FORMAT_KEYS,
})  # fmt: skip
ALLOWED_PARAMS = {
    "chat": COMMON_PARAMS | {"messages", "max_completion_tokens", "top_logprobs"},
    "completions": COMMON_PARAMS | {"prompt"},
}
# Values that change nothing (vLLM's defaults, and the client's own thinking-off), accepted for any
# parameter so that SDKs which send defaults explicitly still work. Compared as JSON text, so `0`
# is not `false`.
NEUTRAL_VALUES = {
    "echo": ("false",), "use_beam_search": ("false",), "add_generation_prompt": ("true",),
    "continue_final_message": ("false",), "ignore_eos": ("false",), "include_stop_str_in_output": ("false",),
    "skip_special_tokens": ("true",), "spaces_between_special_tokens": ("true",), "min_tokens": ("0",),
    "stop": ("null", "[]"), "stop_token_ids": ("null", "[]"), "logit_bias": ("null", "{}"),
    "bad_words": ("null", "[]"), "tools": ("null",), "tool_choice": ("null", '"none"'),
    "prompt_logprobs": ("null",), "chat_template_kwargs": ("null", "{}", '{"enable_thinking": false}'),
    "best_of": ("null", "1"), "length_penalty": ("1.0", "1"), "priority": ("0",),
}  # fmt: skip
REQUEST_ID_HEADER = b"x-request-id"
UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"

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
    return any(body.get(key) is not None for key in FORMAT_KEYS)


def _is_endpoint_format(body: dict[str, Any]) -> bool:
    """Whether the format a request brings is exactly the endpoint schema (in either spelling).
    Any shape is judged, none raises: a malformed format is simply not the endpoint schema."""
    ours = endpoint_json_schema()
    fmt = body.get("response_format")
    if fmt is not None:
        inner = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or schema != ours:
            return False
    so = body.get("structured_outputs")
    if so is not None:
        given = {k for k, v in so.items() if v is not None} if isinstance(so, dict) else None
        if given == {"grammar"}:  # this server's own compact grammar (serve/grammar.py)
            return bool(so["grammar"] == endpoint_grammar())
        if given != {"json"}:
            return False
        json_value = so["json"]
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


def _check_format_shapes(body: dict[str, Any]) -> None:
    """Formats vLLM would answer with a 500 (or take apart in ways no one meant) get a 400 here."""
    fmt, so = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("type"), str)):
        raise PolicyError(
            400, 'response_format must be an object with a "type", such as "json_schema"', "response_format"
        )
    if (
        isinstance(fmt, dict)
        and fmt["type"] == "json_schema"
        and not isinstance(fmt.get("json_schema"), dict)
    ):
        raise PolicyError(
            400, 'response_format of type "json_schema" needs a "json_schema" object', "response_format"
        )
    if so is not None and not isinstance(so, dict):
        raise PolicyError(400, "structured_outputs must be an object", "structured_outputs")


def _whole(key: str, value: object) -> int | None:
    """A count as vLLM should get it: a JSON integer or null. vLLM's pydantic models would take
    1500.0, "1500" and true for 1500, 1500 and 1, past every check made here."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise PolicyError(400, f"{key} must be a whole number, not {json.dumps(value)[:40]}", key)


def _prompts(body: dict[str, Any]) -> int:
    """How many prompts a completions request holds: a string or a token list is one; a list of
    strings or of token lists is one each (prompt_embeds likewise)."""
    count = 0
    for key in ("prompt", "prompt_embeds"):
        value = body.get(key)
        if isinstance(value, list) and not all(isinstance(v, int) for v in value):
            count += len(value)
        elif value is not None:
            count += 1
    return max(count, 1)


def _check_text_only(path: str, messages: object) -> None:
    """Message content must be text. A media part (image_url, audio_url, video_url, file, ...) would
    have vLLM fetch a URL from inside the deployment's network, or decode a file, for an extractor
    that reads text only. Shapes other than these are left for vLLM to refuse with its own 400."""
    conversations = messages if path == "/v1/chat/completions/batch" else [messages]
    for conversation in conversations if isinstance(conversations, list) else ():
        for message in conversation if isinstance(conversation, list) else ():
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise PolicyError(
                        400,
                        f"message content of type {json.dumps(kind)} is not accepted: this server "
                        "extracts endpoints from text; send the text as a string or text parts",
                        "messages",
                    )


def _refusal(param: str, mode: str) -> PolicyError:
    why = (
        "this server's schema policy is 'force'"
        if mode == "force"
        else "the endpoint schema applies to this request (send a format of your own to use it)"
    )
    return PolicyError(
        400,
        f"'{param}' is not accepted with the endpoint schema: it could return text outside it ({why})",
        param,
    )


@dataclass(frozen=True)
class Policy:
    mode: str = "default"
    model: str = "endpoint-extractor"
    max_tokens_cap: int = 1024
    max_request_tokens: int = 4096
    max_body_bytes: int = 1_000_000
    body_timeout: float = 30.0
    # Send the endpoint schema as xgrammar's compact grammar (serve/grammar.py), so every vLLM
    # writes minimal JSON; the policy's decisions are the same either way.
    compact_grammar: bool = False

    @classmethod
    def from_env(cls) -> Policy:
        env = os.environ
        return cls(
            mode=env.get("ENDPOINT_SCHEMA_POLICY", "default"),
            model=env.get("ENDPOINT_SERVED_MODEL_NAME", "endpoint-extractor"),
            max_tokens_cap=int(env.get("ENDPOINT_MAX_TOKENS_CAP", "1024")),
            max_request_tokens=int(env.get("ENDPOINT_MAX_REQUEST_TOKENS", "4096")),
            max_body_bytes=int(env.get("ENDPOINT_MAX_BODY_BYTES", "1000000")),
            body_timeout=float(env.get("ENDPOINT_BODY_TIMEOUT", "30")),
            compact_grammar=compact_grammar_applies(env),
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
        self._check_counts(path, body)
        kind = _kind(path, body)
        if self.mode != "off" and kind == "chat":
            _check_text_only(path, body.get("messages"))
        if self.mode == "off" or path in NON_GENERATING_PATHS or kind is None:
            if self.mode == "force" and path not in NON_GENERATING_PATHS:
                raise PolicyError(
                    400, "this server's schema policy is 'force': send a chat or completions request"
                )
            return body, "none"
        _check_format_shapes(body)
        if self.mode == "force":
            if _brings_format(body) and not _is_endpoint_format(body):
                param = "response_format" if body.get("response_format") is not None else "structured_outputs"
                raise PolicyError(
                    400,
                    f"'{param}' is not accepted: this server's schema policy is 'force', it returns "
                    "endpoint JSON only; drop response_format/structured_outputs or send the endpoint schema",
                    param,
                )
            action = "forced"
        elif _brings_format(body):
            if not _is_endpoint_format(body):
                return body, "kept"  # a format of the request's own: plain vLLM
            action = "kept"
        elif kind == "chat" and (body.get("model") or self.model) == self.model:
            action = "injected"
        else:
            return body, "none"
        self._check_params(kind, body)
        # Rebuilt even when kept, so vLLM parses exactly the body judged here.
        body = {k: v for k, v in body.items() if k not in FORMAT_KEYS}
        if self.compact_grammar:
            return {**body, "structured_outputs": grammar_structured_outputs()}, action
        if kind == "completions":
            return {**body, "structured_outputs": {"json": endpoint_json_schema()}}, action
        return {**body, "response_format": schema_response_format()}, action

    def _check_params(self, kind: str, body: dict[str, Any]) -> None:
        allowed = ALLOWED_PARAMS[kind]
        for key, value in body.items():
            if key in allowed or json.dumps(value) in NEUTRAL_VALUES.get(key, ()):
                continue
            if kind == "chat" and key == "prompt":
                # /invocations: vLLM would try it as a completion when chat validation fails.
                raise PolicyError(400, "send either messages or prompt, not both", key)
            raise _refusal(key, self.mode)

    def _check_counts(self, path: str, body: dict[str, Any]) -> None:
        """Whole numbers, each sequence under the cap, and the whole request within the budget."""
        sampling = body.get("sampling_params")  # /inference/v1/generate
        where = sampling if isinstance(sampling, dict) else body
        counts = {key: _whole(key, where.get(key)) for key in COUNT_KEYS}
        if where is not body:
            for key in COUNT_KEYS:
                _whole(key, body.get(key))
        for key in TOKEN_LIMIT_KEYS:
            value = counts[key]
            if value is not None and value > self.max_tokens_cap:
                raise PolicyError(
                    400, f"{key}={value} exceeds this server's cap of {self.max_tokens_cap}", key
                )
        # vLLM reads one of the spellings (which, depends on the route): count the largest. None
        # given, each sequence may run to the server's cap.
        limits = [v for k in TOKEN_LIMIT_KEYS if (v := counts[k]) is not None]
        per_sequence = max(limits, default=self.max_tokens_cap)
        sequences = max(counts["n"] or 1, counts["best_of"] or 1)
        prompts = 1
        if path in (COMPLETIONS_PATH, SAGEMAKER_PATH) and "messages" not in body:
            prompts = _prompts(body)
        elif path == "/v1/chat/completions/batch" and isinstance(body.get("messages"), list):
            prompts = max(len(body["messages"]), 1)
        total = prompts * sequences * per_sequence
        if total > self.max_request_tokens:
            raise PolicyError(
                400,
                f"this request may generate {prompts} prompt(s) x n={sequences} x {per_sequence} tokens "
                f"= {total} tokens, over this server's per-request budget of {self.max_request_tokens}; "
                "lower n, max_tokens or the number of prompts",
                "n" if sequences > 1 else "prompt" if prompts > 1 else "max_tokens",
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

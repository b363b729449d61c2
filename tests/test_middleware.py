"""The schema policy as pure logic (the e2e and serve tests drive it through a real server)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from client import endpoint_json_schema
from serve.middleware import OPEN_PATHS, Policy, PolicyError, _json_body, route_path, schema_response_format

CHAT = "/v1/chat/completions"
BODY = {"model": "endpoint-extractor", "messages": [{"role": "user", "content": "x"}]}


def test_default_injects_when_no_format() -> None:
    out = Policy("default").apply(CHAT, dict(BODY))
    assert out["response_format"] == schema_response_format()


def test_default_leaves_own_format_alone() -> None:
    own = {**BODY, "response_format": {"type": "json_object"}}
    assert Policy("default").apply(CHAT, own) == own
    so = {**BODY, "structured_outputs": {"regex": "a+"}}
    assert Policy("default").apply(CHAT, so) == so


def test_other_models_and_off_untouched() -> None:
    other = {**BODY, "model": "another"}
    assert Policy("default").apply(CHAT, other) == other
    assert Policy("off").apply(CHAT, dict(BODY)) == BODY


def test_force_rejects_other_formats_and_accepts_ours() -> None:
    with pytest.raises(PolicyError) as err:
        Policy("force").apply(CHAT, {**BODY, "response_format": {"type": "text"}})
    assert err.value.status == 400 and "force" in err.value.message
    ours = {**BODY, "structured_outputs": {"json": endpoint_json_schema()}}
    out = Policy("force").apply(CHAT, ours)
    assert out["response_format"] == schema_response_format() and "structured_outputs" not in out


def test_force_constrains_plain_completions() -> None:
    out = Policy("force").apply("/v1/completions", {"model": "endpoint-extractor", "prompt": "x"})
    assert out["structured_outputs"] == {"json": endpoint_json_schema()}


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_cap(key: str) -> None:
    with pytest.raises(PolicyError) as err:
        Policy(max_tokens_cap=100).apply(CHAT, {**BODY, key: 101})
    assert err.value.status == 400 and "cap of 100" in err.value.message
    assert Policy(max_tokens_cap=100).apply(CHAT, {**BODY, key: 100})[key] == 100


def test_boolean_max_tokens_is_refused() -> None:
    with pytest.raises(PolicyError) as err:
        Policy().apply(CHAT, {**BODY, "max_tokens": True})
    assert err.value.status == 400 and err.value.message == "max_tokens must be a whole number, not true"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"model": ', "request body is not valid JSON: Expecting value at line 1 column 11"),
        (b"", "request body is not valid JSON: Expecting value at line 1 column 1"),
        (b"[1, 2]", "request body must be a JSON object, not an array"),
        (b'"hello"', "request body must be a JSON object, not a string"),
        (b'{"a": "\xff"}', "request body is not valid UTF-8 (byte 7)"),
        (b'{"a": "\xed\xa0\x80"}', "request body is not valid UTF-8 (byte 7)"),  # an encoded surrogate
        (b'{"a": "\\ud800"}', "request body holds a lone surrogate ('\\ud800'); send valid Unicode"),
    ],
)
def test_bodies_a_generation_request_cannot_have(raw: bytes, problem: str) -> None:
    assert _json_body(raw) == (None, problem)


def test_valid_bodies_pass_whole() -> None:
    assert _json_body('{"a": "\\ud83d\\ude00 \u00e9 \u4e2d"}'.encode()) == ({"a": "\U0001f600 é 中"}, None)


# --- every route behind the key (issue 12, item 1) ---------------------------------------------
# Driven through vLLM 0.32's own app (build_app, every optional router switched on), so a route a
# later vLLM adds is guarded, or shows up here, without anyone listing it.

KEY = "k-7f3a"
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
# What a deployment with the key serves besides the probes; anything else vLLM registers is closed.
SERVED_WITH_KEY = {
    "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions", "/invocations",
    "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info", "/load", "/version",
    "/kv_event_sources", "/v1/responses", "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/cancel", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/chat/completions/render", "/v1/messages/render", "/v1/completions/render",
    "/v1/responses/render", "/v1/chat/completions/derender", "/v1/completions/derender",
    "/inference/v1/generate", "/generative_scoring", "/v1/systemone",
}  # fmt: skip


@pytest.fixture(scope="module")
def vllm_app() -> Iterator[Any]:
    """vLLM's real app with this middleware, dev mode, runtime LoRA, fault tolerance and --root-path
    /api; no engine (the guard answers before any handler runs)."""
    saved = dict(os.environ)
    os.environ.update(
        VLLM_API_KEY=KEY,
        VLLM_SERVER_DEV_MODE="1",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
        ENDPOINT_SCHEMA_POLICY="default",
    )
    try:
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        argv = ["--model", "/nonexistent", "--root-path", "/api", "--enable-fault-tolerance"]
        argv += ["--middleware", "serve.middleware.SchemaPolicyMiddleware", "--enable-request-id-headers"]
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        yield build_app(args, supported_tasks=("generate",))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def call(app: Any, method: str, path: str, key: str | None = None, kind: str = "http") -> int:
    """The status ``app`` answers, driven as uvicorn drives it (path percent-decoded, no root_path)."""
    headers = [(b"host", b"t"), (b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope: dict[str, Any] = {
        "type": kind, "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": headers, "http_version": "1.1", "scheme": "http" if kind == "http" else "ws",
        "server": ("t", 80), "client": ("c", 1), "state": {}, "app": app,
    }  # fmt: skip
    if kind == "http":
        scope["method"] = method
    sent: list[dict[str, Any]] = []
    incoming = [
        {"type": "websocket.connect"} if kind == "websocket" else {"type": "http.request", "body": b"{}"}
    ]

    async def receive() -> dict[str, Any]:
        return incoming.pop() if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    if kind == "websocket":
        return 403 if sent and sent[0]["type"] == "websocket.close" else 101
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def _routes(app: Any) -> set[str]:
    return {route.path for route in app.routes}


def test_every_route_and_method_needs_the_key_but_the_probes(vllm_app: Any) -> None:
    routes = _routes(vllm_app)
    assert {"/scale_elastic_ep", "/collective_rpc", "/v1/load_lora_adapter", "/docs"} <= routes
    for route in sorted(routes):
        path = route.replace("{response_id}", "r1").replace("{path}", "x")
        for prefix in ("", "/api"):
            for method in METHODS:
                if route in OPEN_PATHS and method in ("GET", "HEAD"):
                    continue  # its handler needs the engine; the e2e tests call it
                status = call(vllm_app, method, prefix + path)
                assert status == 401, (method, prefix + path, status)
                assert call(vllm_app, method, prefix + path, key="wrong") == 401


def test_closed_routes_are_404_even_with_the_key(vllm_app: Any) -> None:
    routes = _routes(vllm_app)
    closed = routes - SERVED_WITH_KEY - set(OPEN_PATHS)
    assert {
        "/scale_elastic_ep",
        "/is_scaling_elastic_ep",
        "/docs",
        "/redoc",
        "/openapi.json",
        "/sleep",
    } <= closed
    for route in sorted(closed):
        for prefix in ("", "/api"):
            for method in ("GET", "POST"):
                assert call(vllm_app, method, prefix + route, key=KEY) == 404, (method, prefix + route)


@pytest.mark.parametrize(
    "path",
    [
        "//v1/chat/completions", "/v1/../invocations", "/v1/chat/completions/", "/V1/models",
        "/api//invocations", "/api/../tokenize", "/health/", "/HEALTH", "/health/../tokenize",
        "/metrics/x", "/ping/", "/api", "/apiv1/models", "", "/", "/%2e%2e/tokenize", "/v1%2fmodels",
    ],
)  # fmt: skip
def test_path_tricks_never_skip_the_key(vllm_app: Any, path: str) -> None:
    for method in ("GET", "POST", "OPTIONS"):
        assert call(vllm_app, method, path) == 401, (method, path)


def test_websockets_need_the_key(vllm_app: Any) -> None:
    assert call(vllm_app, "", "/v1/realtime", kind="websocket") == 403
    assert call(vllm_app, "", "/api/v1/realtime", kind="websocket") == 403


def test_route_path_strips_the_root_path_as_starlette_routes() -> None:
    from starlette._utils import get_route_path

    for root, path in [("", "/v1/x"), ("/api", "/api/v1/x"), ("/api", "/v1/x"), ("/api", "/api"),
                       ("/api", "/apiv1"), ("/api/", "/api/v1"), ("/a", "//a/v1")]:  # fmt: skip
        assert route_path({"root_path": root, "path": path}) == get_route_path(
            {"root_path": root, "path": path}
        )


# --- no parameter escapes the endpoint schema (item 2) ----------------------------------------

COMPLETIONS = "/v1/completions"
PROMPT = {"model": "endpoint-extractor", "prompt": "x"}
OURS_CHAT = {"type": "json_schema", "json_schema": {"name": "E", "schema": endpoint_json_schema()}}
# Every request parameter vLLM 0.32's ChatCompletionRequest / CompletionRequest /
# BatchChatCompletionRequest accept that can change what comes back, with a value that does.
ESCAPES: dict[str, Any] = {
    "use_beam_search": True, "best_of": 2, "length_penalty": 2.0, "early_stopping": True,
    "echo": True, "prompt_logprobs": 1, "logprob_token_ids": [1], "suffix": "x",
    "continue_final_message": True, "add_generation_prompt": False, "chat_template": "{{ 'x' }}",
    "chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "high",
    "thinking_token_budget": 10, "include_reasoning": False, "documents": [{"title": "a", "text": "b"}],
    "logit_bias": {"1": 100}, "allowed_token_ids": [1, 2], "bad_words": ["a"], "min_tokens": 5,
    "ignore_eos": True, "stop": ["}"], "stop_token_ids": [1], "include_stop_str_in_output": True,
    "skip_special_tokens": False, "spaces_between_special_tokens": False,
    "return_tokens_as_token_ids": True, "return_token_ids": True, "return_prompt_text": True,
    "vllm_xargs": {"a": 1}, "logits_processors": ["x"], "structured_outputs": {"regex": "a+"},
    "guided_json": {}, "guided_regex": "a", "guided_choice": ["a"], "guided_grammar": "x",
    "guided_decoding_backend": "outlines", "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
    "functions": [{"name": "f"}], "function_call": "auto", "parallel_tool_calls": False,
    "prompt_embeds": "AAAA", "priority": -10, "kv_transfer_params": {"do_remote_prefill": True},
    "ec_transfer_params": {}, "cache_salt": "s", "truncate_prompt_tokens": 5, "truncation_side": "left",
    "add_special_tokens": True, "watermarking": True, "repetition_detection": {"n": 2},
    "stream_interval": 4, "mm_processor_kwargs": {}, "media_io_kwargs": {}, "session_id": "s",
    "routed_experts_prompt_start": 1, "return_token_offsets": True, "mm_payload": "none",
    "something_new": 1,
}  # fmt: skip
STRUCTURED_SPELLINGS = [
    {"regex": "a+"}, {"choice": ["a"]}, {"grammar": "root ::= \"a\""}, {"json_object": True},
    {"structural_tag": "{}"}, {"json": {"type": "string"}}, {"json": endpoint_json_schema(), "regex": "a"},
    {"json": endpoint_json_schema(), "whitespace_pattern": "\\s*"}, "x", ["json"], 1,
]  # fmt: skip
FORMAT_SPELLINGS = [
    {"type": "json_object"}, {"type": "text"}, {"type": "structural_tag", "structures": []},
    {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "string"}}},
    {"type": "json_schema", "json_schema": "x"}, {"type": "json_schema"}, {"json_schema": OURS_CHAT["json_schema"]},
    "x", ["json_schema"], 1, True, {"type": ["json_schema"]},
]  # fmt: skip


def _constrained_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(policy, path, body) whose answer must be endpoint JSON: everything under force, requests the
    default policy injects the schema into, and requests that bring the endpoint schema."""
    chat, batch = {**BODY}, {"model": "endpoint-extractor", "messages": [BODY["messages"]]}
    return [
        ("force", CHAT, chat), ("force", "/v1/chat/completions/batch", batch), ("force", COMPLETIONS, PROMPT),
        ("force", "/invocations", chat), ("force", "/invocations", PROMPT), ("force", CHAT, {**chat, "model": "x"}),
        ("default", CHAT, chat), ("default", "/v1/chat/completions/batch", batch), ("default", "/invocations", chat),
        ("default", CHAT, {**chat, "response_format": OURS_CHAT}),
        ("default", COMPLETIONS, {**PROMPT, "structured_outputs": {"json": endpoint_json_schema()}}),
    ]  # fmt: skip


@pytest.mark.parametrize("param", sorted(ESCAPES))
def test_no_parameter_escapes_the_endpoint_schema(param: str) -> None:
    for mode, path, body in _constrained_requests():
        if param in body or (mode == "default" and param in ("response_format", "structured_outputs")):
            continue  # under default, a format of the request's own is its own business
        with pytest.raises(PolicyError) as err:
            Policy(mode).apply(path, {**body, param: ESCAPES[param]})
        assert err.value.status == 400 and err.value.param == param, (mode, path)
        assert f"'{param}'" in err.value.message and "endpoint schema" in err.value.message


@pytest.mark.parametrize("value", STRUCTURED_SPELLINGS + FORMAT_SPELLINGS, ids=repr)
def test_force_refuses_every_other_format_spelling_with_a_400(value: Any) -> None:
    key = "structured_outputs" if value in STRUCTURED_SPELLINGS else "response_format"
    for path, body in ((CHAT, BODY), (COMPLETIONS, PROMPT), ("/invocations", BODY)):
        with pytest.raises(PolicyError) as err:
            Policy("force").apply(path, {**body, key: value})
        assert err.value.status == 400 and err.value.param == key


def test_beam_search_is_refused_where_the_schema_applies_and_kept_where_it_does_not() -> None:
    beam = {**BODY, "use_beam_search": True, "n": 2}
    for mode in ("force", "default"):
        with pytest.raises(PolicyError) as err:
            Policy(mode).apply(CHAT, beam)
        assert err.value.message.startswith("'use_beam_search' is not accepted with the endpoint schema")
    own = {**beam, "response_format": {"type": "json_object"}}
    assert Policy("default").apply(CHAT, own) == own  # a format of the request's own: its business
    assert Policy("default").apply(CHAT, {**beam, "model": "other"})["use_beam_search"] is True
    assert Policy("off").apply(CHAT, beam) == beam


def test_neutral_values_and_the_client_s_own_request_pass() -> None:
    neutral = {
        "echo": False, "use_beam_search": False, "stop": None, "logit_bias": None, "tools": None,
        "tool_choice": "none", "add_generation_prompt": True, "continue_final_message": False,
        "chat_template_kwargs": {"enable_thinking": False}, "prompt_logprobs": None, "ignore_eos": False,
        "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 3,
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 1, "n": 2, "user": "u",
        "request_id": "r", "presence_penalty": 0.1, "frequency_penalty": 0.1, "repetition_penalty": 1.1,
        "max_completion_tokens": 100, "response_format": OURS_CHAT,
    }  # fmt: skip
    for mode in ("force", "default"):
        out = Policy(mode).apply(CHAT, {**BODY, **neutral})
        assert out["response_format"]["json_schema"]["schema"] == endpoint_json_schema()
    for key in ("echo", "use_beam_search", "add_generation_prompt"):
        with pytest.raises(PolicyError):  # neutral means the default exactly, not a look-alike
            Policy("force").apply(
                CHAT, {**BODY, key: {"echo": 1, "use_beam_search": 1, "add_generation_prompt": 0}[key]}
            )


def test_invocations_with_both_messages_and_prompt_is_refused_under_force() -> None:
    # vLLM tries it as chat, then as a completion: the policy could not know which it constrains.
    with pytest.raises(PolicyError) as err:
        Policy("force").apply("/invocations", {**BODY, "prompt": "x"})
    assert err.value.param == "prompt"


# --- a token budget per request (item 4) and whole numbers only (item 5) ----------------------


@pytest.mark.parametrize(
    ("path", "body", "total"),
    [
        (CHAT, {**BODY, "n": 8, "max_tokens": 1024}, 8192),
        (CHAT, {**BODY, "n": 5}, 5120),  # no max_tokens: the server's cap counts
        (CHAT, {**BODY, "n": 2000, "stream": True, "max_tokens": 16}, 32000),
        (CHAT, {**BODY, "n": 3, "max_completion_tokens": 2000, "max_tokens": 1}, None),  # over the cap
        (
            CHAT,
            {**BODY, "n": 8, "max_completion_tokens": 1024, "max_tokens": 1},
            8192,
        ),  # vLLM reads the first
        (COMPLETIONS, {**PROMPT, "prompt": ["a"] * 8, "max_tokens": 1024}, 8192),
        (COMPLETIONS, {**PROMPT, "prompt": [[1, 2]] * 3, "n": 2, "max_tokens": 1000}, 6000),
        ("/v1/chat/completions/batch", {"messages": [BODY["messages"]] * 5}, 5120),
        ("/invocations", {**PROMPT, "prompt": ["a", "b"], "n": 3}, 6144),
        ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": 9, "max_tokens": 1000}}, 9000),
    ],
)
def test_the_budget_counts_every_sequence_of_a_request(
    path: str, body: dict[str, Any], total: int | None
) -> None:
    for mode in ("off", "default", "force"):
        with pytest.raises(PolicyError) as err:
            Policy(mode).apply(path, body)
        assert err.value.status == 400
        if total is not None:
            assert f"= {total} tokens" in err.value.message and "budget of 4096" in err.value.message


def test_within_the_budget_passes() -> None:
    assert Policy("off").apply(CHAT, {**BODY, "n": 4})["n"] == 4  # 4 x the 1024 cap
    assert Policy("off").apply(COMPLETIONS, {**PROMPT, "prompt": [1, 2, 3], "n": 4})["n"] == 4  # one prompt
    assert Policy("off", max_request_tokens=100).apply(CHAT, {**BODY, "n": 2, "max_tokens": 50})
    with pytest.raises(PolicyError):
        Policy("off", max_request_tokens=100).apply(CHAT, {**BODY, "n": 3, "max_tokens": 34})


NOT_WHOLE = [1500.0, "1500", True, False, 1.5, "many", [1], {"a": 1}, 1e400]
COUNT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of")


@pytest.mark.parametrize("value", NOT_WHOLE, ids=repr)
@pytest.mark.parametrize("key", COUNT_KEYS)
def test_token_limits_and_counts_must_be_whole_json_numbers(key: str, value: Any) -> None:
    for mode in ("off", "default", "force"):
        for body in ({**BODY, key: value}, {"token_ids": [1], "sampling_params": {key: value}}):
            with pytest.raises(PolicyError) as err:
                Policy(mode).apply(CHAT if "messages" in body else "/inference/v1/generate", body)
            assert err.value.status == 400 and err.value.param == key
            assert err.value.message.startswith(f"{key} must be a whole number, not ")


SHAPES: list[Any] = [None, True, 0, -1, 1.5, "x", "", [], [1], ["x"], [[1]], [{}], {}, {"a": 1}, {"type": 1}]
READ_FIELDS = (
    "model", "messages", "prompt", "prompt_embeds", "response_format", "structured_outputs", "n",
    "max_tokens", "max_completion_tokens", "stream", "sampling_params", "tools", "chat_template_kwargs",
)  # fmt: skip
PATHS = (
    CHAT,
    "/v1/chat/completions/batch",
    COMPLETIONS,
    "/invocations",
    "/inference/v1/generate",
    "/v1/responses",
)


@pytest.mark.parametrize("field", READ_FIELDS)
def test_any_shape_of_any_field_is_a_decision_or_a_400(field: str) -> None:
    """Fuzz: never an exception but PolicyError (the middleware would answer 500)."""
    for mode in ("off", "default", "force"):
        for path in PATHS:
            for base in (BODY, PROMPT, {}):
                for shape in SHAPES:
                    for nested in (shape, {"json_schema": shape, "type": "json_schema"}, {"json": shape}):
                        try:
                            Policy(mode).decide(path, {**base, field: nested})
                        except PolicyError as exc:
                            assert exc.status == 400 and exc.message


def test_response_format_malformed_under_force_is_a_400() -> None:
    for value in (
        "x",
        {"type": "json_schema", "json_schema": "x"},
        ["x"],
        {"type": "json_schema", "json_schema": ["x"]},
    ):
        with pytest.raises(PolicyError) as err:
            Policy("force").apply(CHAT, {**BODY, "response_format": value})
        assert err.value.status == 400 and err.value.param == "response_format"


MEDIA_PARTS = [
    {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}},
    {"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}},
    {"type": "video_url", "video_url": {"url": "file:///etc/passwd"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_data": "AAAA"}},
    {"image_url": {"url": "http://example.invalid/x.png"}},  # no type: vLLM guesses image_url
    "not a part",
]


@pytest.mark.parametrize("part", MEDIA_PARTS, ids=lambda p: str(p.get("type") if isinstance(p, dict) else p))
@pytest.mark.parametrize("mode", ["default", "force"])
def test_media_content_is_refused_so_the_server_fetches_nothing(part: Any, mode: str) -> None:
    text = {"type": "text", "text": "Body height"}
    messages = [{"role": "user", "content": [text, part]}]
    for path, body in (
        ("/v1/chat/completions", {"model": "endpoint-extractor", "messages": messages}),
        ("/invocations", {"model": "endpoint-extractor", "messages": messages}),
        ("/v1/chat/completions/batch", {"model": "endpoint-extractor", "messages": [messages]}),
        # A request with a format of its own is plain vLLM under `default`, but still fetches nothing.
        ("/v1/chat/completions", {"messages": messages, "response_format": {"type": "json_object"}}),
    ):
        with pytest.raises(PolicyError) as err:
            Policy(mode=mode).decide(path, body)
        assert err.value.status == 400 and err.value.param == "messages", path


def test_text_parts_pass_and_off_is_plain_vllm() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Body height"}]}]
    assert Policy().decide("/v1/chat/completions", {"messages": messages})[1] == "injected"
    media = [{"role": "user", "content": [MEDIA_PARTS[0]]}]
    assert Policy(mode="off").decide("/v1/chat/completions", {"messages": media})[1] == "none"


def test_compact_grammar_replaces_the_schema_wherever_the_schema_applies() -> None:
    from serve.grammar import grammar_structured_outputs

    policy = Policy(compact_grammar=True)
    ours = {
        "model": "endpoint-extractor",
        "messages": BODY["messages"],
        "response_format": schema_response_format(),
    }
    for mode, body in (("default", dict(BODY)), ("default", ours), ("force", dict(BODY)), ("force", ours)):
        out, action = Policy(mode=mode, compact_grammar=True).decide(CHAT, body)
        assert out["structured_outputs"] == grammar_structured_outputs() and "response_format" not in out, (
            action
        )
    out, _ = Policy(mode="force", compact_grammar=True).decide("/v1/completions", {"prompt": "x"})
    assert out["structured_outputs"] == grammar_structured_outputs()
    # A request's own format stays its own; our grammar sent back to us is the endpoint format.
    own = {**BODY, "response_format": {"type": "json_object"}}
    assert policy.apply(CHAT, own) == own
    echoed = {**BODY, "structured_outputs": grammar_structured_outputs()}
    assert Policy(mode="force", compact_grammar=True).decide(CHAT, echoed)[1] == "forced"
    with pytest.raises(PolicyError):
        Policy(mode="force").decide(CHAT, {**BODY, "structured_outputs": {"grammar": 'root ::= "x"'}})


def test_compact_grammar_follows_the_backend_and_whitespace_settings() -> None:
    from serve.grammar import compact_grammar_applies

    assert compact_grammar_applies({})
    assert not compact_grammar_applies({"ENDPOINT_STRUCTURED_BACKEND": "guidance"})
    assert not compact_grammar_applies({"ENDPOINT_ANY_WHITESPACE": "1"})


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_refused_request_s_body_is_read_before_the_answer(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unread body bytes make the server's close a TCP reset, which can lose the 401 in a proxy."""
    from serve.middleware import SchemaPolicyMiddleware

    monkeypatch.setenv("VLLM_API_KEY", "k")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused request never reaches vLLM")

    chunks = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.request", "body": b"}"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/v1/models", "headers": [(b"content-length", b"2")]}
    asyncio.run(SchemaPolicyMiddleware(app)(scope, receive, send))
    assert sent[0]["status"] == 401 and chunks == []

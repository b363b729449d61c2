"""The schema policy and the request limits on real vLLM CPU servers, through raw HTTP and the
OpenAI SDK, streaming included: `default` (the session server) and `force` with an API key and
JSON logs (one server for this module)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from openai import OpenAI

from client import EndpointExtraction, build_messages
from serve.launcher import ServerProcess
from serve.settings import ServeSettings
from serve.supervisor import probe
from tests.conftest import free_port

pytestmark = pytest.mark.e2e
MODEL = "endpoint-extractor"
KEY = "test-key-7f3a"
TEXT = "Overall survival | [Time Frame: up to 5 years]"
# A schema of the request's own, whose every valid answer is told apart from endpoint JSON.
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no"]}},
    "required": ["verdict"],
    "additionalProperties": False,
}
VERDICT_FORMAT = {"type": "json_schema", "json_schema": {"name": "Verdict", "schema": VERDICT_SCHEMA}}


def streamed_text(sdk: OpenAI, **kwargs: object) -> str:
    stream = sdk.chat.completions.create(model=MODEL, messages=build_messages(TEXT), stream=True, **kwargs)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def log_shows(server: ServerProcess, text: str, timeout: float = 15.0) -> bool:
    """Whether the server's log shows ``text`` soon: the access line is written after the reply."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in Path(server.log_path or "").read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


# --- default ---------------------------------------------------------------------------------


def test_default_injects_into_streamed_sdk_requests(server) -> None:
    sdk = OpenAI(base_url=server.base_url, api_key="unused")
    EndpointExtraction.model_validate_json(streamed_text(sdk, max_tokens=512))


def test_default_keeps_a_request_s_own_schema(server) -> None:
    sdk = OpenAI(base_url=server.base_url, api_key="unused")
    reply = sdk.chat.completions.create(
        model=MODEL, messages=build_messages(TEXT), response_format=VERDICT_FORMAT, max_tokens=64
    )
    assert json.loads(reply.choices[0].message.content or "") in ({"verdict": "yes"}, {"verdict": "no"})
    # The other spelling, over raw HTTP and streamed.
    body = {
        "model": MODEL,
        "messages": build_messages(TEXT),
        "structured_outputs": {"json": VERDICT_SCHEMA},
        "max_tokens": 64,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert json.loads(text) in ({"verdict": "yes"}, {"verdict": "no"})


def test_max_tokens_over_the_cap_is_a_clear_400(server) -> None:
    sdk = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=MODEL, messages=build_messages(TEXT), max_tokens=5000)
    assert "max_tokens=5000 exceeds this server's cap of 1024" in str(err.value)
    assert err.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_oversized_body_is_a_clear_413(server) -> None:
    body = {"model": MODEL, "messages": build_messages("x" * 1_100_000)}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body exceeds this server's limit of 1000000 bytes"
    # Chunked, with no length declared up front: counted as it arrives.
    encoded = json.dumps(body).encode()
    chunks = iter([encoded[i : i + 65536] for i in range(0, len(encoded), 65536)])
    response = httpx.post(f"{server.base_url}/chat/completions", content=chunks, timeout=60)
    assert response.status_code == 413


def test_request_ids_reach_the_engine_the_response_and_the_log(server) -> None:
    body = {"model": MODEL, "messages": build_messages(TEXT), "max_tokens": 256}
    mine = httpx.post(
        f"{server.base_url}/chat/completions", json=body, headers={"X-Request-Id": "trial-42"}, timeout=120
    )
    assert mine.headers["x-request-id"] == "trial-42" and mine.json()["id"] == "chatcmpl-trial-42"
    given = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)
    request_id = given.headers["x-request-id"]
    assert len(request_id) == 32 and given.json()["id"] == f"chatcmpl-{request_id}"
    assert log_shows(server, f"POST /v1/chat/completions 200 request_id={request_id} schema=injected")


def test_prometheus_metrics_count_requests(server) -> None:
    def successes() -> float:
        text = httpx.get(server.root_url + "/metrics", timeout=30).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:request_success_total{")
        )

    before = successes()
    body = {"model": MODEL, "messages": build_messages(TEXT), "max_tokens": 256}
    assert httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120).status_code == 200
    deadline = time.monotonic() + 15  # the engine's stats reach the API server just after the reply
    while successes() != before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert successes() == before + 1


# --- force, with an API key and JSON logs ----------------------------------------------------


@pytest.fixture(scope="module")
def forced(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    settings = ServeSettings(
        demo=True, demo_dir=demo_dir, port=free_port(), schema_policy="force", api_key=KEY, log_format="json"
    )
    # ServerProcess hands the key to `python -m serve` as ENDPOINT_API_KEY, never on argv.
    with ServerProcess(settings, log_path=tmp_path_factory.mktemp("force") / "serve.log") as proc:
        yield proc


def test_force_refuses_a_missing_or_wrong_key(forced: ServerProcess) -> None:
    body = {"model": MODEL, "messages": build_messages(TEXT)}
    response = httpx.post(f"{forced.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=forced.base_url, api_key="wrong", max_retries=0).models.list()
    # Probes stay open, as in vLLM: /health and /metrics need no key.
    assert httpx.get(forced.root_url + "/health", timeout=30).status_code == 200


def test_the_key_is_never_logged_nor_on_a_command_line(forced: ServerProcess) -> None:
    assert forced.process is not None
    sdk = OpenAI(base_url=forced.base_url, api_key=KEY, max_retries=0)
    sdk.chat.completions.create(model=MODEL, messages=build_messages(TEXT), max_tokens=64)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=forced.base_url, api_key=KEY + "-wrong", max_retries=0).models.list()
    log = Path(forced.log_path or "").read_text(errors="replace")
    assert '"api_key": "***"' in log or "'api_key': '***'" in log  # the settings line masks it
    assert KEY not in log
    family = [
        psutil.Process(forced.process.pid),
        *psutil.Process(forced.process.pid).children(recursive=True),
    ]
    assert len(family) >= 3  # serve, vLLM's API server, its engine
    for proc in family:
        assert not any(KEY in arg for arg in proc.cmdline()), proc.cmdline()


def test_force_gives_endpoint_json_on_every_open_route(forced: ServerProcess) -> None:
    sdk = OpenAI(base_url=forced.base_url, api_key=KEY, max_retries=0)
    reply = sdk.chat.completions.create(model=MODEL, messages=build_messages(TEXT), max_tokens=512)
    EndpointExtraction.model_validate_json(reply.choices[0].message.content or "")
    EndpointExtraction.model_validate_json(streamed_text(sdk, max_tokens=512))
    # Even a plain completion of a raw prompt is constrained.
    completion = sdk.completions.create(model=MODEL, prompt="Body height", max_tokens=512)
    EndpointExtraction.model_validate_json(completion.choices[0].text)
    # The endpoint schema brought by the request itself is accepted.
    parsed = sdk.chat.completions.parse(
        model=MODEL, messages=build_messages(TEXT), response_format=EndpointExtraction, max_tokens=512
    )
    assert isinstance(parsed.choices[0].message.parsed, EndpointExtraction)


def test_force_rejects_another_format_with_a_clear_400(forced: ServerProcess) -> None:
    sdk = OpenAI(base_url=forced.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(
            model=MODEL, messages=build_messages(TEXT), response_format=VERDICT_FORMAT, stream=True
        )
    assert "schema policy is 'force'" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(
            model=MODEL, messages=build_messages(TEXT), extra_body={"structured_outputs": {"regex": "a+"}}
        )


def test_force_closes_unconstrained_routes(forced: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in (
        ("/v1/responses", {"model": MODEL, "input": TEXT}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": TEXT}]}),
        ("/inference/v1/generate", {"model": MODEL, "token_ids": [1, 2, 3]}),
    ):
        response = httpx.post(forced.root_url + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 403, path
        assert (
            response.json()["error"]["message"] == f"{path} is closed: this server's schema policy is 'force'"
        )


def test_json_logs_carry_the_request_id(forced: ServerProcess) -> None:
    sdk = OpenAI(base_url=forced.base_url, api_key=KEY, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=build_messages(TEXT),
        max_tokens=256,
        extra_headers={"X-Request-Id": "json-log-1"},
    )
    assert raw.headers["x-request-id"] == "json-log-1"
    assert log_shows(forced, '"request_id": "json-log-1"')
    records = [
        json.loads(line)
        for line in Path(forced.log_path or "").read_text().splitlines()
        if line.startswith("{")
    ]
    assert any(r["name"].startswith("vllm.") and r["levelname"] == "INFO" for r in records)
    access = [r for r in records if r.get("request_id") == "json-log-1"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["schema_policy"] == "forced"


# --- issue 12: every route behind the key, nothing escapes the schema ------------------------

# The routes the issue found open without the key, and more of each kind.
UNKEYED = [
    ("POST", "/invocations", {"model": MODEL, "messages": [{"role": "user", "content": TEXT}]}),
    ("POST", "/tokenize", {"model": MODEL, "prompt": TEXT}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
    ("POST", "/generative_scoring", {"model": MODEL}),
    ("POST", "/scale_elastic_ep", {"new_data_parallel_size": 1}),
    ("POST", "/is_scaling_elastic_ep", {}),
    ("GET", "/load", None),
    ("GET", "/version", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
    ("OPTIONS", "/v1/models", None),
    ("HEAD", "/v1/models", None),
    ("POST", "/ping", {}),
    ("GET", "//v1/models", None),
    ("GET", "/v1/models/", None),
]


def test_every_route_needs_the_key_but_the_probes(forced: ServerProcess) -> None:
    for method, path, body in UNKEYED:
        response = httpx.request(method, forced.root_url + path, json=body, timeout=30)
        assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
    for path in ("/health", "/ping", "/metrics"):
        assert httpx.get(forced.root_url + path, timeout=30).status_code == 200, path
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path in (("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/scale_elastic_ep")):
        response = httpx.request(method, forced.root_url + path, json={}, headers=headers, timeout=30)
        assert response.status_code == 404, (method, path)
    assert httpx.get(forced.root_url + "/version", headers=headers, timeout=30).status_code == 200


def test_force_refuses_every_parameter_that_escapes_the_schema(forced: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    chat_body = {"model": MODEL, "messages": build_messages(TEXT), "max_tokens": 32}
    for path, body, param in (
        ("/v1/chat/completions", {**chat_body, "use_beam_search": True, "n": 2}, "use_beam_search"),
        ("/invocations", {**chat_body, "use_beam_search": True, "n": 2}, "use_beam_search"),
        ("/v1/completions", {"model": MODEL, "prompt": "Body height", "echo": True, "max_tokens": 8}, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "prompt_logprobs": 5, "max_tokens": 8}, "prompt_logprobs"),
        ("/v1/chat/completions", {**chat_body, "chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
        ("/v1/chat/completions", {**chat_body, "logit_bias": {"1": 100}}, "logit_bias"),
        ("/v1/chat/completions/batch", {**chat_body, "messages": [build_messages(TEXT)], "echo": True}, "echo"),
    ):  # fmt: skip
        response = httpx.post(forced.root_url + path, json=body, headers=headers, timeout=120)
        assert response.status_code == 400, (path, param, response.text[:300])
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "response_format",
    ["x", {"type": "json_schema", "json_schema": "x"}, ["json_schema"], {"type": "json_schema"}],
    ids=repr,
)
def test_force_answers_a_malformed_response_format_with_a_400(
    forced: ServerProcess, response_format: object
) -> None:
    body = {"model": MODEL, "messages": build_messages(TEXT), "response_format": response_format}
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(f"{forced.base_url}/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_logprobs_under_force_only_show_what_the_grammar_allows(forced: ServerProcess) -> None:
    """vLLM masks the logits with the grammar before it computes logprobs: at the first position,
    only tokens that can begin compact endpoint JSON (`{`) have a finite logprob."""
    sdk = OpenAI(base_url=forced.base_url, api_key=KEY, max_retries=0)
    reply = sdk.chat.completions.create(
        model=MODEL, messages=build_messages(TEXT), max_tokens=8, logprobs=True, top_logprobs=5
    )
    first = reply.choices[0].logprobs.content[0]  # type: ignore[union-attr,index]
    assert first.token.startswith("{")
    finite = [alt.token for alt in first.top_logprobs if alt.logprob > -9000]
    assert finite and all(token.startswith("{") for token in finite), first.top_logprobs


def test_engine_death_turns_health_red_and_ends_in_a_failure(forced: ServerProcess) -> None:
    """Last here: it ends the module's server. vLLM itself exits 0 when its engine dies."""
    assert forced.process is not None
    engines = [
        p for p in psutil.Process(forced.process.pid).children(recursive=True) if "EngineCore" in p.name()
    ]
    assert len(engines) == 1
    engines[0].kill()
    statuses = []
    deadline = time.monotonic() + 60
    while forced.process.poll() is None and time.monotonic() < deadline:
        statuses.append(probe(forced.root_url + "/health"))
        time.sleep(0.2)
    assert 503 in statuses and 200 not in statuses[statuses.index(503) :]
    assert forced.process.wait(timeout=60) == 1
    errors = [
        line
        for line in Path(forced.log_path or "").read_text().splitlines()
        if line.startswith("serve: error:")
    ]
    assert len(errors) == 1 and errors[0].startswith("serve: error: vLLM exited with code 0 unexpectedly: ")
    assert "EngineDeadError" in errors[0]

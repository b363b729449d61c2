"""Client logic against an in-process transport: retries, error mapping, truncation. (The e2e
tests use the real server.)"""

from __future__ import annotations

import json

import httpx
import pytest

from client import (
    AuthenticationError,
    EndpointClient,
    InvalidOutputError,
    OutputTruncatedError,
    RequestRejectedError,
    ServerUnavailableError,
)

VALID = json.dumps({"endpoints": [{
    "endpoint_name_standardized": "Body height", "measurement_of": "height", "measurement_type": "continuous",
    "metric_type": None, "timeframe": None, "measurement_method": None, "evaluation_criteria": None,
    "unit": "cm", "population": None, "is_composite": False, "components": []}]})  # fmt: skip


def completion(content: str, finish: str = "stop") -> dict:
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "endpoint-extractor",
        "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }  # fmt: skip


def make_client(handler, **kwargs) -> EndpointClient:  # type: ignore[no-untyped-def]
    return EndpointClient("http://test/v1", transport=httpx.MockTransport(handler), **kwargs)


def test_retries_5xx_and_429_then_succeeds() -> None:
    answers = [
        httpx.Response(503),
        httpx.Response(429, headers={"retry-after": "0"}),
        httpx.Response(200, json=completion(VALID)),
    ]
    client = make_client(lambda request: answers.pop(0))
    assert client.extract("Body height").endpoints[0].unit == "cm"
    assert client.usage.requests == 1 and client.usage.total_tokens == 15


def test_gives_up_with_server_unavailable() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(500, json={"error": {"message": "boom"}}, headers={"retry-after": "0"})

    client = make_client(handler, max_retries=2)
    with pytest.raises(ServerUnavailableError) as err:
        client.extract("x")
    assert len(calls) == 3 and err.value.attempts == 3 and "boom" in str(err.value)


def test_4xx_is_rejected_at_once_with_server_message() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "max_tokens too large"}})

    with pytest.raises(RequestRejectedError) as err:
        make_client(handler).extract("x")
    assert len(calls) == 1 and err.value.status_code == 400 and err.value.message == "max_tokens too large"
    with pytest.raises(AuthenticationError):
        make_client(lambda r: httpx.Response(401, json={"error": {"message": "no key"}})).extract("x")


def test_one_request_with_the_servers_cap_and_no_second_generation_on_truncation() -> None:
    budgets = []

    def handler(request: httpx.Request) -> httpx.Response:
        budgets.append(json.loads(request.content).get("max_tokens"))
        return httpx.Response(200, json=completion('{"endpoints": [', "length"))

    # No max_tokens sent: the server's cap is the budget (and vLLM fits it to a long prompt).
    with pytest.raises(OutputTruncatedError, match="the server's max_tokens cap") as err:
        make_client(handler).extract("x")
    assert budgets == [None] and err.value.raw == '{"endpoints": [' and err.value.max_tokens is None
    with pytest.raises(OutputTruncatedError, match="max_tokens=100"):
        make_client(handler, max_tokens=100).extract("x")
    assert budgets == [None, 100]


def test_invalid_output_carries_raw_text() -> None:
    with pytest.raises(InvalidOutputError) as err:
        make_client(lambda r: httpx.Response(200, json=completion('{"endpoints": []}'))).extract("x")
    assert err.value.raw == '{"endpoints": []}'


def test_extract_many_keeps_order_and_isolates_failures() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][1]["content"]
        if "bad" in text:
            return httpx.Response(400, json={"error": {"message": "nope"}})
        return httpx.Response(200, json=completion(VALID))

    results = make_client(handler).extract_many(["a", "bad", "", "c"], concurrency=4)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.ok for r in results] == [True, False, False, True]

"""The client behaves as an openai-python user expects (issue 13), and a misbehaving server never
gets anything but an EndpointError out of it (issue 12, items 6, 7, 9). Pure client logic against
in-process transports; the e2e tests use the real server."""

from __future__ import annotations

import asyncio
import email.utils
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import (
    APITimeoutError,
    AsyncEndpointClient,
    AuthenticationError,
    ClientClosedError,
    EndpointClient,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RateLimitError,
    RequestRejectedError,
    ServerUnavailableError,
)
from client import _client as impl
from client._constants import BACKOFF_INITIAL, BACKOFF_MAX, RETRY_AFTER_MAX
from client._retry import _backoff
from tests.test_client_unit import VALID, completion

ROOT = Path(__file__).resolve().parent.parent
URL = "http://test/v1"
Handler = Callable[[httpx.Request], httpx.Response]


def sync(handler: Handler, **kwargs: Any) -> EndpointClient:
    return EndpointClient(URL, transport=httpx.MockTransport(handler), **kwargs)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=completion(VALID), headers={"x-request-id": "req-ok"})


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The waits between attempts, recorded instead of slept (tenacity sleeps with time.sleep)."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    yield slept


class Script:
    """Answers with the given responses (or raises the given exceptions) in turn, then ``ok``."""

    def __init__(self, *steps: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.steps:
            return ok(request)
        step = self.steps.pop(0)
        return step if isinstance(step, httpx.Response) else step(request)


def read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


# -- key and URL from the environment ----------------------------------------------------------


def test_key_and_url_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENDPOINT_API_KEY", "sk-env")
    monkeypatch.setenv("ENDPOINT_BASE_URL", "http://from-env:9000/v1/")
    script = Script()
    with EndpointClient(transport=httpx.MockTransport(script)) as client:
        client.extract("Body height")
        assert client.base_url == "http://from-env:9000/v1"
    [request] = script.requests
    assert request.url == "http://from-env:9000/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-env"
    with EndpointClient(api_key="sk-arg", transport=httpx.MockTransport(script)) as client:
        client.extract("Body height")  # an argument wins over the environment
    assert script.requests[-1].headers["authorization"] == "Bearer sk-arg"


def test_no_key_sends_no_authorization_and_a_401_says_the_key_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENDPOINT_API_KEY", "")  # empty is unset, as a shell `X=` means
    script = Script(httpx.Response(401, json={"error": {"message": "Unauthorized"}}))
    with (
        EndpointClient(URL, transport=httpx.MockTransport(script)) as client,
        pytest.raises(AuthenticationError) as err,
    ):
        client.extract("Body height")
    assert "authorization" not in script.requests[0].headers  # not "Bearer EMPTY"
    assert "no API key was given" in str(err.value) and "ENDPOINT_API_KEY" in str(err.value)
    assert "Unauthorized" in str(err.value) and len(script.requests) == 1
    wrong = Script(httpx.Response(401, json={"error": {"message": "Unauthorized"}}))
    with pytest.raises(AuthenticationError, match="the API key was refused"):
        EndpointClient(URL, api_key="wrong", transport=httpx.MockTransport(wrong)).extract("x")


@pytest.mark.parametrize("key", ["", "  ", " sk", "sk-\n", "ключ", "sk\x00"])
def test_a_key_that_cannot_be_sent_is_refused_at_once(key: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        EndpointClient(URL, api_key=key)


@pytest.mark.parametrize("url", ["ftp://x/v1", "localhost:8000", "http://", "not a url", "/v1"])
def test_a_base_url_that_is_not_http_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        EndpointClient(url)


# -- bring your own HTTP client -----------------------------------------------------------------


def test_http_client_is_accepted_sync_and_async_and_its_timeout_kept() -> None:
    script = Script()
    mine = httpx.Client(transport=httpx.MockTransport(script), headers={"x-team": "t1"}, timeout=7.0)
    with EndpointClient(URL, http_client=mine) as client:
        assert client.extract("Body height").endpoints[0].unit == "cm"
        assert client._options.timeout == httpx.Timeout(7.0)
    assert script.requests[0].headers["x-team"] == "t1"
    assert mine.is_closed  # closed with the client, as openai-python does

    async def run() -> None:
        async def handler(request: httpx.Request) -> httpx.Response:
            return ok(request)

        mine = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async with AsyncEndpointClient(URL, http_client=mine, timeout=3) as client:
            assert (await client.extract("Body height")).endpoints[0].unit == "cm"
            assert client._options.timeout == httpx.Timeout(3)
        assert mine.is_closed

    asyncio.run(run())


def test_http_client_of_the_wrong_kind_or_with_a_transport_is_refused() -> None:
    with pytest.raises(TypeError, match="httpx.Client"):
        EndpointClient(URL, http_client=httpx.AsyncClient())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="httpx.AsyncClient"):
        AsyncEndpointClient(URL, http_client=httpx.Client())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        EndpointClient(URL, http_client=httpx.Client(), transport=httpx.MockTransport(ok))


# -- errors: one hierarchy, openai-python's attributes -----------------------------------------


def test_a_rejected_request_carries_status_request_id_response_body_and_cause() -> None:
    body = {"error": {"message": "max_tokens too large", "type": "BadRequestError"}}
    client = sync(lambda r: httpx.Response(400, json=body, headers={"x-request-id": "req-400"}))
    with pytest.raises(RequestRejectedError) as err:
        client.extract("Body height")
    e = err.value
    assert (e.status_code, e.request_id, e.body, e.message) == (400, "req-400", body, "max_tokens too large")
    assert e.response is not None and e.response.status_code == 400
    assert isinstance(e.__cause__, httpx.HTTPStatusError)


def test_rate_limits_are_their_own_type_after_the_retries(sleeps: list[float]) -> None:
    limited = httpx.Response(
        429, json={"error": {"message": "slow down"}}, headers={"x-request-id": "req-429"}
    )
    client = sync(lambda r: limited, max_retries=2)
    with pytest.raises(RateLimitError) as err:
        client.extract("Body height")
    e = err.value
    assert isinstance(e, ServerUnavailableError) and e.attempts == 3 and len(sleeps) == 2
    assert (e.status_code, e.request_id, e.body) == (429, "req-429", {"error": {"message": "slow down"}})
    assert not e.server_down  # a rate limit is not an outage
    assert isinstance(e.__cause__, httpx.HTTPStatusError)


def test_a_read_timeout_is_api_timeout_retried_and_not_server_down(sleeps: list[float]) -> None:
    script = Script(read_timeout, read_timeout, read_timeout)
    with pytest.raises(APITimeoutError) as err:
        sync(script, max_retries=2).extract("Body height")
    e = err.value
    assert isinstance(e, ServerUnavailableError) and e.attempts == 3 and len(script.requests) == 3
    assert not e.server_down and e.status_code is None and e.request_id is None and e.response is None
    assert isinstance(e.__cause__, httpx.ReadTimeout)
    assert sync(Script(read_timeout), max_retries=1).extract("Body height")  # retried per policy


@pytest.mark.parametrize(
    ("steps", "down"),
    [
        ([refused] * 3, True),
        ([httpx.Response(503)] * 3, True),
        ([httpx.Response(502), refused, httpx.Response(504)], True),
        ([httpx.Response(500)] * 3, False),
        ([httpx.Response(429)] * 3, False),
        ([read_timeout] * 3, False),
        ([refused, refused, read_timeout], False),
        ([httpx.Response(503), httpx.Response(503), httpx.Response(500)], False),
        ([lambda r: (_ for _ in ()).throw(httpx.RemoteProtocolError("server disconnected"))] * 3, False),
    ],
    ids=[
        "refused",
        "503",
        "502-refused-504",
        "500",
        "429",
        "read-timeout",
        "refused-then-timeout",
        "503-then-500",
        "dropped",
    ],  # fmt: skip
)
def test_server_down_only_when_no_attempt_found_a_server_that_could_serve(
    steps: list[Any], down: bool, sleeps: list[float]
) -> None:
    with pytest.raises(ServerUnavailableError) as err:
        sync(Script(*steps, *steps), max_retries=2).extract("Body height")
    assert err.value.server_down is down and err.value.attempts == 3
    assert err.value.__cause__ is not None


def test_every_error_of_a_failed_call_is_an_endpoint_error_with_the_attributes() -> None:
    for cls in (EndpointError, InvalidInputError, ClientClosedError, ServerUnavailableError, APITimeoutError):
        e = cls("x", attempts=1) if issubclass(cls, ServerUnavailableError) else cls("x")
        assert (e.status_code, e.request_id, e.response, e.body) == (None, None, None, None)
    assert issubclass(APITimeoutError, ServerUnavailableError) and issubclass(
        RateLimitError, ServerUnavailableError
    )
    assert issubclass(ClientClosedError, EndpointError)


# -- retries: x-should-retry, Retry-After, backoff --------------------------------------------


def test_x_should_retry_is_obeyed_both_ways(sleeps: list[float]) -> None:
    no = Script(httpx.Response(503, headers={"x-should-retry": "false"}))
    with pytest.raises(ServerUnavailableError) as err:
        sync(no).extract("Body height")
    assert len(no.requests) == 1 and err.value.attempts == 1
    yes = Script(
        httpx.Response(400, headers={"x-should-retry": "true"}, json={"error": {"message": "flaky"}})
    )
    assert sync(yes).extract("Body height").endpoints[0].unit == "cm"
    assert len(yes.requests) == 2


class HTTPDate(str):
    """A Retry-After date this many seconds after the moment the test runs (not collection)."""

    def __str__(self) -> str:
        return email.utils.formatdate(time.time() + float(self), usegmt=True)


def http_date(seconds_from_now: float) -> str:
    return HTTPDate(seconds_from_now)


def answer_429(headers: dict[str, str]) -> httpx.Response:
    return httpx.Response(429, headers={k: str(v) for k, v in headers.items()})


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"retry-after-ms": "9000"}, 9.0, 9.0),
        ({"retry-after-ms": "1500", "retry-after": "30"}, 1.5, 1.5),  # ms first, as openai-python
        ({"retry-after": "9"}, 9.0, 9.0),
        ({"retry-after": "2.5"}, 2.5, 2.5),
        ({"retry-after": http_date(30)}, 27.0, 30.0),
    ],
    ids=["ms", "ms-before-seconds", "seconds", "fraction", "http-date"],
)
def test_retry_after_in_all_three_forms(
    headers: dict[str, str], low: float, high: float, sleeps: list[float]
) -> None:
    script = Script(answer_429(headers))
    sync(script).extract("Body height")
    assert len(script.requests) == 2 and len(sleeps) == 1 and low <= sleeps[0] <= high


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": str(RETRY_AFTER_MAX + 1)},
        {"retry-after": "1e999"},
        {"retry-after-ms": "3600000"},
        {"retry-after": http_date(3600)},
    ],  # fmt: skip
    ids=["seconds", "overflow", "ms", "http-date"],
)
def test_a_retry_after_over_the_cap_is_not_waited_for(headers: dict[str, str], sleeps: list[float]) -> None:
    script = Script(answer_429(headers))
    with pytest.raises(RateLimitError):
        sync(script).extract("Body height")
    assert len(script.requests) == 1 and sleeps == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"retry-after": "soon"},
        {"retry-after": "0"},
        {"retry-after": "-5"},
        {"retry-after": http_date(-60)},
        {"retry-after": "nan"},
    ],  # fmt: skip
    ids=["none", "garbage", "zero", "negative", "past-date", "nan"],
)
def test_backoff_has_a_floor_as_openai_python(headers: dict[str, str], sleeps: list[float]) -> None:
    script = Script(*[httpx.Response(503, headers={k: str(v) for k, v in headers.items()})] * 4)
    sync(script, max_retries=4).extract("Body height")
    assert len(sleeps) == 4
    for n, slept in enumerate(sleeps):
        base = min(BACKOFF_INITIAL * 2**n, BACKOFF_MAX)
        assert 0.75 * base <= slept <= base, (n, slept)


def test_backoff_distribution() -> None:
    for n in range(8):
        base = min(BACKOFF_INITIAL * 2**n, BACKOFF_MAX)
        waits = [_backoff(n) for _ in range(2000)]
        assert min(waits) >= 0.75 * base and max(waits) <= base
    assert _backoff(10_000) <= BACKOFF_MAX  # no overflow


# -- with_options -------------------------------------------------------------------------------


def test_with_options_shares_the_pool_and_usage_and_opens_no_client(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[httpx.Client] = []
    real_init = httpx.Client.__init__

    def counting(self: httpx.Client, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "__init__", counting)
    script = Script()
    client = sync(script, max_retries=4)
    copy = client.with_options(max_retries=0, timeout=3.0, max_tokens=64)
    assert len(made) == 1 and copy._shared is client._shared and copy.usage is client.usage
    assert (client._options.max_retries, copy._options.max_retries) == (4, 0)
    assert copy._options.timeout == httpx.Timeout(3.0) and client._options.timeout != httpx.Timeout(3.0)
    copy.extract("Body height")
    client.extract("Body height")
    assert client.usage.requests == 2 and copy.usage.total_tokens == 30
    assert json.loads(script.requests[0].content)["max_tokens"] == 64
    assert script.requests[0].extensions["timeout"]["read"] == 3.0
    with copy:  # closing a copy leaves the pool it shares open
        pass
    with pytest.raises(ClientClosedError):
        copy.extract("Body height")
    client.extract("Body height")
    other = client.with_options(max_retries=1)
    client.close()  # closing the client closes its copies' pool
    with pytest.raises(ClientClosedError):
        other.extract("Body height")


def test_with_options_checks_what_it_is_given() -> None:
    client = sync(ok)
    with pytest.raises(TypeError):
        client.with_options(timeout="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.with_options(max_retries=-1)
    with pytest.raises(TypeError):
        client.with_options(max_retires=3)  # type: ignore[call-arg]


# -- typing: keywords are typed, so mypy catches a misspelt or mistyped one ------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retires": 3},
        {"timeout": "10"},
        {"max_retries": "3"},
        {"max_retries": True},
        {"timeout": -1},
        {"max_tokens": 0},
        {"max_connections": 1.5},
        {"grounding": "yes"},
        {"model": ""},
    ],  # fmt: skip
)
def test_wrong_keywords_fail_at_run_time_too(kwargs: dict[str, Any]) -> None:
    for cls in (EndpointClient, AsyncEndpointClient):
        with pytest.raises((TypeError, ValueError)):
            cls(URL, **kwargs)


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mypy_rejects_wrong_keywords_and_client_passes_strict() -> None:
    wrong = _mypy("--strict", "tests/typing/wrong_keywords.py")
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    lines = wrong.stdout.splitlines()
    expected = {
        "max_retires": 'Unexpected keyword argument "max_retires"',
        'timeout="10"': 'Argument "timeout" to "EndpointClient" has incompatible type "str"',
        "async timeout": 'Argument "timeout" to "AsyncEndpointClient" has incompatible type "str"',
        "with_options": 'Unexpected keyword argument "max_retires" for "with_options"',
        "http_client": 'Argument "http_client" to "EndpointClient" has incompatible type "AsyncClient"',
    }
    for what, message in expected.items():
        assert any(message in line for line in lines), (what, wrong.stdout)
    marked = sum(
        ")  # error:" in line for line in (ROOT / "tests/typing/wrong_keywords.py").read_text().splitlines()
    )
    assert len([line for line in lines if ": error:" in line]) == marked, wrong.stdout
    right = _mypy("--strict", "tests/typing/right_keywords.py")
    assert right.returncode == 0, right.stdout
    client = _mypy()  # pyproject's [tool.mypy]: strict over client/
    assert client.returncode == 0, client.stdout


# -- after close() --------------------------------------------------------------------------------


def test_any_call_after_close_is_client_closed_error() -> None:
    client = sync(ok)
    client.close()
    client.close()  # twice is fine
    for call in (lambda: client.extract("Body height"), client.served_models):
        with pytest.raises(ClientClosedError):
            call()
    results = client.extract_many(["a", "b"])
    assert all(isinstance(r.error, ClientClosedError) for r in results)
    mine = httpx.Client(transport=httpx.MockTransport(ok))
    theirs = EndpointClient(URL, http_client=mine)
    mine.close()  # the caller closed the client it lent
    with pytest.raises(ClientClosedError, match="http_client"):
        theirs.extract("Body height")

    async def run() -> None:
        client = AsyncEndpointClient(URL, transport=httpx.MockTransport(ok))
        await client.close()
        with pytest.raises(ClientClosedError):
            await client.extract("Body height")
        with pytest.raises(ClientClosedError):
            await client._post_chat({"messages": []})

    asyncio.run(run())


# -- malformed 2xx: that call's InvalidOutputError, nothing else (issue 12, item 6) ----------------

MESSAGE = {"role": "assistant", "content": VALID}


def choice(**changes: Any) -> dict[str, Any]:
    return {"index": 0, "finish_reason": "stop", "message": MESSAGE, **changes}


def body(**changes: Any) -> dict[str, Any]:
    return {**completion(VALID), **changes}


MALFORMED: dict[str, Any] = {
    "null message": body(choices=[choice(message=None)]),
    "message a string": body(choices=[choice(message=VALID)]),
    "no message": body(choices=[{"index": 0, "finish_reason": "stop"}]),
    "null content": body(choices=[choice(message={"role": "assistant", "content": None})]),
    "content a number": body(choices=[choice(message={"role": "assistant", "content": 7})]),
    "content a dict": body(choices=[choice(message={"role": "assistant", "content": json.loads(VALID)})]),
    "no content": body(choices=[choice(message={"role": "assistant"})]),
    "tool calls only": body(
        choices=[choice(message={"role": "assistant", "content": None, "tool_calls": [{}]})]
    ),
    "no choices": {k: v for k, v in completion(VALID).items() if k != "choices"},
    "empty choices": body(choices=[]),
    "null choices": body(choices=None),
    "choices a dict": body(choices={"0": choice()}),
    "choices a string": body(choices="abc"),
    "choice a string": body(choices=["abc"]),
    "choice null": body(choices=[None]),
    "usage a string": body(usage="lots"),
    "usage tokens a string": body(usage={"prompt_tokens": "many", "completion_tokens": 1}),
    "usage tokens negative": body(usage={"prompt_tokens": -1, "completion_tokens": 1}),
    "usage tokens a bool": body(usage={"prompt_tokens": True, "completion_tokens": 1}),
    "body a list": [completion(VALID)],
    "body a string": "ok",
    "body null": None,
    "body a number": 200,
    "text body": b"<html>It works!</html>",
    "empty body": b"",
    "not UTF-8": b"\xff\xfe{",
    "deeply nested": b"[" * 100_000,
    "truncated JSON": json.dumps(completion(VALID)).encode()[:-3],
    "content not JSON": body(choices=[choice(message={"role": "assistant", "content": "Sure! Here:"})]),
    "content deeply nested": body(choices=[choice(message={"role": "assistant", "content": "[" * 100_000})]),
    "content escapes a lone surrogate": body(
        choices=[choice(message={"role": "assistant", "content": VALID.replace('"cm"', '"\\ud800"')})]
    ),
    "content holds a lone surrogate": json.dumps(
        body(choices=[choice(message={"role": "assistant", "content": VALID.replace("cm", "\ud800")})])
    ).encode(),
}
# Well-formed chat completions whose text is no extraction: the OpenAI Batch pass-through sends
# them on as they are.
ENVELOPE_OK = {"tool calls only", "content not JSON", "content deeply nested", "content escapes a lone surrogate",
               "content holds a lone surrogate"}  # fmt: skip


def malformed(answer: Any) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        text = request.content.decode()
        if "BAD" not in text and not request.url.path.endswith("/models"):
            return ok(request)
        headers = {"x-request-id": "req-bad"}
        if isinstance(answer, bytes):
            return httpx.Response(200, content=answer, headers=headers)
        return httpx.Response(200, json=answer, headers=headers)

    return handler


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_2xx_is_invalid_output_for_that_call_only(case: str) -> None:
    answer = MALFORMED[case]
    client = sync(malformed(answer))
    with pytest.raises(InvalidOutputError) as err:
        client.extract("BAD text")
    e = err.value
    assert (e.status_code, e.request_id) == (200, "req-bad") and e.response is not None and str(e)
    results = client.extract_many(["one", "BAD two", "three"], concurrency=3)
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, InvalidOutputError)
    assert client.usage.requests == 4  # answered, so counted (no tokens from a malformed one)

    async def run() -> None:
        async with AsyncEndpointClient(URL, transport=httpx.MockTransport(malformed(answer))) as client:
            with pytest.raises(InvalidOutputError):
                await client.extract("BAD text")
            results = await client.extract_many(["one", "BAD two", "three"], concurrency=3)
            assert [r.ok for r in results] == [True, False, True]
            post = client._post_chat({"messages": [{"role": "user", "content": "BAD"}]})
            if case in ENVELOPE_OK:
                response, payload = await post
                assert response.status_code == 200
                assert payload == (json.loads(answer) if isinstance(answer, bytes) else answer)
            else:
                with pytest.raises(InvalidOutputError) as err:
                    await post
                assert err.value.request_id == "req-bad"

    asyncio.run(run())


def test_served_models_with_a_malformed_answer_is_invalid_output() -> None:
    for answer in ({"data": None}, {"data": [{"id": 1}]}, {"data": []}, [], b"nope"):
        with pytest.raises(InvalidOutputError):
            sync(malformed(answer)).served_models()


def test_nothing_outside_the_hierarchy_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug anywhere on the way (here: the prompt builder) is an EndpointError with the cause."""

    def broken(text: str) -> Any:
        if "BAD" in text:
            raise KeyError("a bug")
        return [{"role": "system", "content": "s"}, {"role": "user", "content": text}]

    monkeypatch.setattr(impl, "build_messages", broken)
    client = sync(ok)
    with pytest.raises(EndpointError) as err:
        client.extract("BAD")
    assert isinstance(err.value.__cause__, KeyError)
    assert [r.ok for r in client.extract_many(["a", "BAD", "c"])] == [True, False, True]

    async def run() -> None:
        async with AsyncEndpointClient(URL, transport=httpx.MockTransport(ok)) as client:
            with pytest.raises(EndpointError):
                await client.extract("BAD")

    asyncio.run(run())


def test_async_extract_many_never_cancels_or_drops_the_others() -> None:
    async def run() -> None:
        finished: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            text = json.loads(request.content)["messages"][1]["content"]
            if "BAD" in text:
                return httpx.Response(200, json=MALFORMED["null message"])
            await asyncio.sleep(0.05)  # still running when the bad one fails
            finished.append(text)
            return ok(request)

        async with AsyncEndpointClient(URL, transport=httpx.MockTransport(handler)) as client:
            results = await client.extract_many(["a", "BAD", "c", "d"], concurrency=4)
        assert [r.ok for r in results] == [True, False, True, True]
        assert len(finished) == 3 and not any("BAD" in text for text in finished)

    asyncio.run(run())


@pytest.mark.parametrize("texts", ["one string", b"bytes", 5, None])
def test_extract_many_refuses_what_is_not_a_list_of_texts(texts: Any) -> None:
    with pytest.raises(InvalidInputError):
        sync(ok).extract_many(texts)


@pytest.mark.parametrize("concurrency", [0, -1, "8", 1.5, True, 65])
def test_extract_many_refuses_a_bad_concurrency(concurrency: Any) -> None:
    with pytest.raises(InvalidInputError):
        sync(ok).extract_many(["a"], concurrency=concurrency)


# -- request ids on every error that had a response (issue 12, item 9) --------------------------


def test_errors_carry_the_request_id(sleeps: list[float]) -> None:
    cases: list[tuple[httpx.Response, type[EndpointError]]] = [
        (httpx.Response(400, json={"error": {"message": "no"}}), RequestRejectedError),
        (httpx.Response(401, json={"error": {"message": "no"}}), AuthenticationError),
        (httpx.Response(500, json={"error": {"message": "boom"}}), ServerUnavailableError),
        (httpx.Response(503, text="draining"), ServerUnavailableError),
        (httpx.Response(429), RateLimitError),
        (httpx.Response(200, json=completion('{"endpoints": [', "length")), OutputTruncatedError),
        (httpx.Response(200, json=completion('{"endpoints": []}')), InvalidOutputError),
    ]
    for answer, cls in cases:
        answer.headers["x-request-id"] = f"req-{answer.status_code}"
        with pytest.raises(cls) as err:
            sync(lambda r, a=answer: a, max_retries=1).extract("Body height")
        assert type(err.value) is cls and err.value.request_id == f"req-{answer.status_code}"
        assert err.value.status_code == answer.status_code and err.value.response is answer
    with pytest.raises(ServerUnavailableError) as down:
        sync(refused, max_retries=0).extract("Body height")
    assert down.value.request_id is None and down.value.response is None


def test_the_error_body_is_the_servers_and_the_message_says_what_it_said() -> None:
    client = sync(lambda r: httpx.Response(422, text="<html>bad\n gateway</html>"))
    with pytest.raises(RequestRejectedError) as err:
        client.extract("Body height")
    assert (
        err.value.body == "<html>bad\n gateway</html>" and str(err.value) == "422: <html>bad gateway</html>"
    )
    client = sync(lambda r: httpx.Response(404, json={"detail": "Not Found"}))
    with pytest.raises(RequestRejectedError, match="^404: Not Found$"):
        client.extract("Body height")


# -- output budget --------------------------------------------------------------------------------


def test_async_one_request_with_the_servers_cap() -> None:
    budgets: list[int | None] = []

    async def run() -> None:
        async def handler(request: httpx.Request) -> httpx.Response:
            budgets.append(json.loads(request.content).get("max_tokens"))
            return httpx.Response(200, json=completion('{"endpoints": [', "length"))

        async with AsyncEndpointClient(URL, transport=httpx.MockTransport(handler)) as client:
            with pytest.raises(OutputTruncatedError) as err:
                await client.extract("Body height")
            assert err.value.max_tokens is None and client.usage.requests == 1

    asyncio.run(run())
    assert budgets == [None]


# -- review: keys, retry decisions and messages under odd answers --------------------------------


@pytest.mark.parametrize("key", ["sk-secret\n", "sk-sec\rret", " sk-secret", "sk-sécret", "   "])
def test_an_unsendable_key_from_the_environment_is_refused_without_quoting_it(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to go out as is: h11 refused the header with an error that quoted it, the client
    took that for an unreachable server (retried, cool-down) and printed the key in the message."""
    from tests.local_server import MODELS, Reply, local_server

    monkeypatch.setenv("ENDPOINT_API_KEY", key)
    with local_server(lambda path, body: Reply(body=MODELS)) as server:
        for make in (EndpointClient, AsyncEndpointClient):
            with pytest.raises(ValueError, match="ENDPOINT_API_KEY") as err:
                make(server.base_url, max_retries=1).close()  # type: ignore[operator]
            assert "sec" not in str(err.value)
        assert server.requests == []


def test_a_request_that_cannot_be_sent_is_not_retried_and_never_quotes_the_key(
    sleeps: list[float],
) -> None:
    """Whatever slips past the checks (here a header of the caller's own http_client) fails at once
    as InvalidInputError: nothing reached a server, so nothing is retried or cooled down."""
    from tests.local_server import MODELS, Reply, local_server

    with local_server(lambda path, body: Reply(body=MODELS)) as server:
        http = httpx.Client(headers={"x-bad": "sk-secret\n"})
        with (
            EndpointClient(server.base_url, api_key="sk-secret", http_client=http) as client,
            pytest.raises(InvalidInputError, match="cannot be sent") as err,
        ):
            client.served_models()
        assert "sk-secret" not in str(err.value) and "***" in str(err.value)
        assert server.requests == [] and sleeps == []
        assert client._pool.servers[0].down_until == 0.0


def test_a_long_retry_after_never_makes_a_non_retryable_answer_retried() -> None:
    """A 400 (or x-should-retry: false) with a long Retry-After went to the next server of a pool."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if len(seen) == 1:
            return httpx.Response(400, json={"error": {"message": "bad"}}, headers={"retry-after": "3600"})
        return httpx.Response(503, headers={"retry-after": "3600", "x-should-retry": "false"})

    transport = httpx.MockTransport(handler)
    with EndpointClient(["http://a/v1", "http://b/v1"], transport=transport) as client:
        with pytest.raises(RequestRejectedError):
            client.extract("Body height")
        assert len(seen) == 1
        with pytest.raises(ServerUnavailableError):
            client.extract("Body height")
        assert len(seen) == 2


@pytest.mark.parametrize("flag", ["True", "TRUE", " true "])
def test_x_should_retry_in_any_casing(flag: str, sleeps: list[float]) -> None:
    script = Script(httpx.Response(400, headers={"x-should-retry": flag}, json={}))
    assert sync(script).extract("Body height").endpoints
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "first line\nsecond line\r\n\tthird " + "x" * 5000}},
        {"detail": "a\nb " + "y" * 5000},
        "plain\ntext " + "z" * 5000,
    ],
    ids=["error.message", "detail", "text"],
)
def test_a_servers_message_is_one_bounded_line_and_the_body_is_kept(body: object) -> None:
    response = httpx.Response(400, json=body) if not isinstance(body, str) else httpx.Response(400, text=body)
    with pytest.raises(RequestRejectedError) as err:
        sync(Script(response)).extract("Body height")
    message = str(err.value)
    assert "\n" not in message and "\r" not in message and "\t" not in message
    assert len(message) <= 600 and message.endswith("…")
    assert err.value.body == body  # all of it, as the server sent it


def test_a_body_that_cannot_be_decoded_is_invalid_output() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        stream = httpx.ByteStream(b"not gzip at all")
        return httpx.Response(200, stream=stream, headers={"content-encoding": "gzip"})

    with pytest.raises(InvalidOutputError, match="cannot be decoded"):
        sync(broken, max_retries=0).extract("Body height")


def test_the_client_imports_no_server_side_package() -> None:
    """A client-only install has pydantic, httpx, tenacity and tqdm; nothing else may be pulled in."""
    code = (
        "import sys, client, client.batch, client.__main__; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch', 'serve', 'openai', "
        "'transformers', 'benchmarks', 'tests'}); print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == ""

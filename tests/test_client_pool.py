"""Several base URLs: balancing by requests in flight and fail-over, against in-process transports
(pure client logic; the e2e test kills a real vLLM server mid-job)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from client import AsyncEndpointClient, EndpointClient, RequestRejectedError, ServerUnavailableError
from client.__main__ import build_parser
from tests.test_client_unit import VALID, completion

A, B = "http://a.test/v1", "http://b.test/v1"
Handler = Callable[[httpx.Request], httpx.Response]


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=completion(VALID))


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def servers(a: Handler, b: Handler, hits: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.host[0])
        return (a if request.url.host == "a.test" else b)(request)

    return httpx.MockTransport(handler)


def test_one_url_is_as_before_and_urls_are_checked() -> None:
    with EndpointClient(A) as one, EndpointClient([A, B]) as two:
        assert one.base_url == A and one.base_urls == (A,)
        assert two.base_url == A and two.base_urls == (A, B)
        assert two.with_options(max_retries=0).base_urls == (A, B)
    for bad in ([], [A, A], [A, ""]):
        with pytest.raises(ValueError):
            EndpointClient(bad)


def test_ties_go_round_robin() -> None:
    hits: list[str] = []
    with EndpointClient([A, B], transport=servers(ok, ok, hits)) as client:
        for _ in range(4):
            client.extract("Body height")
    assert hits == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    "failure",
    [
        refused,
        lambda request: (_ for _ in ()).throw(httpx.ConnectTimeout("timed out", request=request)),
        lambda request: (_ for _ in ()).throw(httpx.RemoteProtocolError("server disconnected")),
        lambda request: httpx.Response(503, json={"error": {"message": "draining"}}),
        lambda request: httpx.Response(502),
    ],
    ids=["refused", "connect-timeout", "disconnected", "503", "502"],
)
def test_a_dead_server_fails_over_sits_out_and_rejoins(failure: Handler) -> None:
    hits: list[str] = []
    a_is_up = False

    def a(request: httpx.Request) -> httpx.Response:
        return ok(request) if a_is_up else failure(request)

    # max_retries=0: going to the other server is fail-over, not a retry.
    with EndpointClient([A, B], transport=servers(a, ok, hits), max_retries=0) as client:
        client.extract("Body height")
        assert hits == ["a", "b"] and client.usage.requests == 1  # answered and counted once
        for _ in range(3):
            client.extract("Body height")
        assert hits[2:] == ["b", "b", "b"]  # a sits out its cool-down
        a_is_up = True
        client._pool.cooldown = 0.0
        client._pool.servers[0].down_until = time.monotonic()
        client.extract("Body height")
        client.extract("Body height")
        assert sorted(hits[5:]) == ["a", "b"]  # back in turn after the cool-down
        assert client.usage.requests == 6


def test_all_servers_down_is_server_unavailable_after_trying_each() -> None:
    hits: list[str] = []
    with EndpointClient([A, B], transport=servers(refused, refused, hits), max_retries=0) as client:
        with pytest.raises(ServerUnavailableError) as err:
            client.extract("Body height")
        assert sorted(hits) == ["a", "b"] and err.value.attempts == 2
        assert "all 2 servers tried and failed" in str(err.value) and "cannot reach" in str(err.value)
        hits.clear()
        with pytest.raises(ServerUnavailableError):  # both in cool-down: still tried, not refused here
            client.extract("Body height")
        assert sorted(hits) == ["a", "b"]


def test_attempts_stay_bounded_while_other_servers_cool_down() -> None:
    hits: list[str] = []

    def boom(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"message": "boom"}})

    with EndpointClient([A, B], transport=servers(boom, ok, hits), max_retries=0) as client:
        client._pool.servers[1].down_until = time.monotonic() + 3600  # b failed for another call
        with pytest.raises(ServerUnavailableError, match=r"^1 of 2 servers tried and failed") as err:
            client.extract("Body height")
        assert hits == ["a", "a"] and err.value.attempts == 2  # max_retries + one per server


def test_one_server_keeps_its_retries_and_message() -> None:
    answers = [httpx.Response(503, headers={"retry-after": "0"}), httpx.Response(200, json=completion(VALID))]
    with EndpointClient(A, transport=httpx.MockTransport(lambda r: answers.pop(0)), max_retries=1) as client:
        assert client.extract("Body height").endpoints[0].unit == "cm"
    with (
        EndpointClient(A, transport=httpx.MockTransport(refused), max_retries=0) as client,
        pytest.raises(ServerUnavailableError, match=r"^cannot reach the server after 1 attempts"),
    ):
        client.extract("Body height")


def test_a_bad_request_is_not_failed_over() -> None:
    hits: list[str] = []

    def bad(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens too large"}})

    with EndpointClient([A, B], transport=servers(bad, bad, hits)) as client:
        with pytest.raises(RequestRejectedError):
            client.extract("Body height")
        assert len(hits) == 1


def test_async_least_in_flight_and_fail_over() -> None:
    async def run() -> None:
        hits: list[str] = []
        release = asyncio.Event()
        a_dead = False

        async def handler(request: httpx.Request) -> httpx.Response:
            host = request.url.host[0]
            hits.append(host)
            if host == "a":
                if a_dead:
                    raise httpx.ConnectError("connection refused", request=request)
                await release.wait()
            return ok(request)

        async with AsyncEndpointClient([A, B], transport=httpx.MockTransport(handler)) as client:
            slow = asyncio.create_task(client.extract("Body height"))  # a ties first and hangs
            while not hits:
                await asyncio.sleep(0)
            for _ in range(3):  # a has one in flight, b none: every one goes to b
                await client.extract("Body height")
            assert hits == ["a", "b", "b", "b"]
            release.set()
            await slow
            a_dead = True
            for _ in range(4):
                await client.extract("Body height")
            assert hits[4:].count("a") == 1  # refused once (within two turns), then sits out
            results = await client.extract_many(["Body height"] * 6, concurrency=3)
            assert all(r.ok for r in results) and client.usage.requests == 14
            assert hits[4:].count("a") == 1

    asyncio.run(run())


def test_async_a_retry_goes_first_to_a_server_not_yet_tried() -> None:
    async def run() -> None:
        hits: list[str] = []
        release = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            hits.append(request.url.host[0])
            if hits[-1] == "b":
                return httpx.Response(500, json={"error": {"message": "boom"}})
            if len(hits) == 1:
                await release.wait()
            return ok(request)

        transport = httpx.MockTransport(handler)
        async with AsyncEndpointClient([A, B], transport=transport, max_retries=1) as client:
            slow = asyncio.create_task(client.extract("Body height"))  # a, first in turn, hangs
            while not hits:
                await asyncio.sleep(0)
            # b has fewer in flight and answers 500 (not a down server); the retry goes to a.
            await client.extract("Body height")
            assert hits == ["a", "b", "a"]
            release.set()
            await slow

    asyncio.run(run())


def test_cli_takes_several_base_urls() -> None:
    args = build_parser().parse_args(["batch", "in.jsonl", "out.jsonl", "--base-url", A, "--base-url", B])
    assert args.base_url == [A, B]
    assert build_parser().parse_args(["--base-url", A, "extract", "x"]).base_url == [A]
    assert build_parser().parse_args(["extract", "x"]).base_url is None

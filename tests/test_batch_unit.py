"""Bulk-job logic against an in-process transport: formats, bad lines, torn-line repair, resume
bookkeeping, --retry-failed compaction, the OpenAI Batch pass-through. The real server runs the
same job in test_batch_e2e.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from client import AsyncEndpointClient, AuthenticationError, BatchError, ServerUnavailableError
from client.__main__ import main as cli
from client.batch import (
    BatchConfig,
    BatchJob,
    Record,
    Summary,
    _open_locked,
    detect_format,
    iter_records,
    repair_tail,
)
from tests.local_server import CLOSE, HANG, Reply, local_server
from tests.test_client_unit import VALID, completion

MODELS = {
    "object": "list",
    "data": [{"id": "endpoint-extractor", "object": "model", "created": 0, "owned_by": "me"}],
}


class FakeServer:
    """An httpx handler: answers /models, fails texts containing a marker, logs what was sent."""

    def __init__(self, fail: str = "FAIL", status: int = 400) -> None:
        self.fail, self.status = fail, status
        self.sent: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        body = json.loads(request.content)
        text = body["messages"][-1]["content"]
        self.sent.append(text)
        if self.fail and self.fail in text:
            return httpx.Response(
                self.status,
                json={"error": {"message": "rejected by the fake"}},
                headers={"x-request-id": "req-f"},
            )
        return httpx.Response(200, json=completion(VALID), headers={"x-request-id": "req-1"})


def run(config: BatchConfig, server: Callable[[httpx.Request], Any], **client_kwargs: Any) -> Summary:
    async def go() -> Summary:
        transport = httpx.MockTransport(server)
        async with AsyncEndpointClient("http://fake/v1", transport=transport, **client_kwargs) as client:
            return await BatchJob(config).run(client)

    return asyncio.run(go())


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def ids(lines: list[dict[str, Any]], field: str = "id") -> Counter[Any]:
    return Counter(line[field] if line[field] is not None else ("line", line["line"]) for line in lines)


@pytest.fixture
def twenty(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": f"endpoint {i}"} for i in range(20)])


def test_format_detection(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "a.jsonl", [b"{broken", {"id": 1, "text": "x"}])
    batch = write_jsonl(tmp_path / "b.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}])  # fmt: skip
    table = tmp_path / "c.CSV"
    table.write_text("id,text\n1,x\n")
    assert [detect_format(p) for p in (plain, batch, table)] == ["jsonl", "openai", "csv"]
    assert detect_format(table, "jsonl") == "jsonl"
    table_as_txt = tmp_path / "d.txt"
    table_as_txt.write_text("id,text\n1,x\n")
    with pytest.raises(BatchError, match="--format csv"):
        detect_format(table_as_txt)


def test_bad_jsonl_lines_become_problems_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    rows: list[Any] = [
        {"id": "ok", "text": "fine"},
        b"{not json",
        b'{"id": "bin", "text": "\xff\xfe"}',
        b'{"id": "nul", "text": "a\x00b"}',
        {"id": "notext"},
        {"id": "numtext", "text": 5},
        {"text": "no id"},
        {"id": True, "text": "bool id"},
        [1, 2],
        b"   ",
        {"id": 7, "text": "int id"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    records = list(iter_records(BatchConfig(path, tmp_path / "o"), "jsonl"))
    got = [(r.line, r.id, (r.problem or "").split(": ", 1)[-1]) for r in records]
    assert got == [
        (1, "ok", ""),
        (2, None, "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        (3, None, "not valid UTF-8 (byte offset 23)"),
        (4, None, "contains NUL bytes"),
        (5, "notext", "no 'text' field"),
        (6, "numtext", "'text' is not a string"),
        (7, None, "no 'id' field (a string or an integer)"),
        (8, None, "an unusable 'id' field (a string or an integer)"),
        (9, None, "expected a JSON object, got list"),
        (11, 7, ""),
    ]
    assert records[-1].key == "7" and records[1].key == 2


def test_overlong_line_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("client._batch_input.BATCH_MAX_LINE_BYTES", 64)
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x" * 200}, {"id": "b", "text": "short"}])
    records = list(iter_records(BatchConfig(path, tmp_path / "o"), "jsonl"))
    assert [(r.line, r.problem is None) for r in records] == [(1, False), (2, True)]
    assert "longer than 64 bytes" in (records[0].problem or "")


def test_csv_records(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(
        b'\xef\xbb\xbfnct,endpoint\nA,"multi\nline text"\nB,bad \xff byte\n,no id\nC\nD,nul\x00\n\nE,last\n'
    )
    config = BatchConfig(path, tmp_path / "o", id_field="nct", text_field="endpoint")
    records = list(iter_records(config, "csv"))
    assert [(r.line, r.id, r.text, r.problem is None) for r in records] == [
        (2, "A", "multi\nline text", True),
        (4, "B", None, False),
        (5, None, None, False),
        (6, "C", None, False),
        (7, "D", None, False),
        (9, "E", "last", True),
    ]
    with pytest.raises(BatchError, match="no column 'text'"):
        list(iter_records(BatchConfig(path, tmp_path / "o", id_field="nct"), "csv"))


def test_repair_tail_cuts_only_a_torn_last_line(tmp_path: Path) -> None:
    good = b'{"id": "a", "ok": true}\n{"id": "b", "ok": false}\n'
    out = tmp_path / "out.jsonl"
    for tail, removed in [
        (b"", 0),
        (b'{"id": "c", "o', 14),
        (b"\x00" * 4096, 4096),
        (b"\x00" * 10 + b"\n", 11),
    ]:
        out.write_bytes(good + tail)
        assert repair_tail(out, "jsonl") == removed
        assert out.read_bytes() == good
    out.write_bytes(b'{"id": "c", "o')
    assert repair_tail(out, "jsonl") == 14 and out.read_bytes() == b""


def test_resume_sends_each_id_once_and_repairs_a_torn_line(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    server = FakeServer()
    first = run(BatchConfig(twenty, out, concurrency=4, limit=7), server)
    assert (first.ok, first.failed, first.complete) == (7, 0, False)
    with out.open("ab") as f:  # a crash in the middle of a write
        f.write(b'{"id": "r19", "line": 20, "ok": tr')
    second = run(BatchConfig(twenty, out, concurrency=4), server)
    assert (second.ok, second.skipped, second.complete, second.output_ok) == (13, 7, True, 20)
    assert len(server.sent) == 20 and len(set(server.sent)) == 20
    assert ids(read_out(out)) == Counter({f"r{i}": 1 for i in range(20)})
    third = run(BatchConfig(twenty, out), server)
    assert (third.processed, third.skipped) == (0, 20) and len(server.sent) == 20


def test_retry_failed_reruns_only_failures_and_compacts(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "text": f"endpoint {i}" + (" FAIL" if i % 4 == 0 else "")} for i in range(12)]
    inp = write_jsonl(tmp_path / "in.jsonl", [*rows, b"{broken"])
    out = tmp_path / "out.jsonl"
    server = FakeServer()
    first = run(BatchConfig(inp, out), server)
    assert (first.ok, first.failed, first.output_failed) == (9, 4, 4)
    failed = [line for line in read_out(out) if not line["ok"]]
    assert {line["error"]["type"] for line in failed} == {"RequestRejectedError", "InvalidInputError"}

    server.fail = ""  # the server now accepts them; the broken line stays broken
    again = run(BatchConfig(inp, out, retry_failed=True), server)
    assert (again.ok, again.failed, again.skipped) == (3, 1, 9)
    assert len(server.sent) == 12 + 3
    lines = read_out(out)
    assert len(lines) == 13 and ids(lines) == Counter({**{f"r{i}": 1 for i in range(12)}, ("line", 13): 1})
    assert [line["id"] for line in lines if not line["ok"]] == [None]

    # The broken line, fixed, gets an id: its id-less failure is dropped, the new id processed.
    write_jsonl(inp, [*rows, {"id": "fixed", "text": "now fine"}])
    fixed = run(BatchConfig(inp, out), server)
    assert (fixed.ok, fixed.processed, fixed.output_failed) == (1, 1, 0)
    assert ids(read_out(out)) == Counter({**{f"r{i}": 1 for i in range(12)}, "fixed": 1})


def test_a_crash_after_retrying_leaves_duplicates_that_the_next_run_compacts(
    twenty: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    run(BatchConfig(twenty, out), FakeServer())
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines) + lines[0].replace(b'"ok": true', b'"ok": false'))  # stale duplicate
    summary = run(BatchConfig(twenty, out), FakeServer())
    assert summary.processed == 0 and summary.output_failed == 1
    assert len(read_out(out)) == 20


def test_duplicate_ids_are_rejected_before_anything_is_written(tmp_path: Path) -> None:
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": "1", "text": "c"}]
    )
    out = tmp_path / "out.jsonl"
    server = FakeServer()
    with pytest.raises(BatchError, match=r"duplicate id '1' on lines 1 and 3"):
        run(BatchConfig(inp, out), server)
    assert not out.exists() and server.sent == []


def test_output_that_is_not_ours_is_refused(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "r1", "ok": true}\nsomething else\n{"id": "r2", "ok": true}\n')
    with pytest.raises(BatchError, match="line 2 is not a client batch result line"):
        run(BatchConfig(twenty, out), FakeServer())


def test_a_second_job_on_the_same_output_is_refused(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with _open_locked(out), pytest.raises(BatchError, match="in use by another batch job"):
        run(BatchConfig(twenty, out), FakeServer())


def test_cancelled_job_keeps_whole_lines_and_resumes(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    calls = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        calls += 1
        await asyncio.sleep(0.01 if calls <= 6 else 30)
        return httpx.Response(200, json=completion(VALID))

    async def go() -> Summary:
        async with AsyncEndpointClient("http://fake/v1", transport=httpx.MockTransport(slow)) as client:
            job = BatchJob(BatchConfig(twenty, out, concurrency=3))
            task = asyncio.create_task(job.run(client))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if job.summary.processed >= 5:
                    break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return job.summary

    partial = asyncio.run(go())
    assert 5 <= partial.processed <= 6 and len(read_out(out)) == partial.processed
    rest = run(BatchConfig(twenty, out), FakeServer())
    assert rest.processed == 20 - partial.processed
    assert ids(read_out(out)) == Counter({f"r{i}": 1 for i in range(20)})


def test_openai_batch_format_in_and_out(tmp_path: Path) -> None:
    def request(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
        messages = [{"role": "user", "content": text}]
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "endpoint-extractor", "messages": messages, **body}}  # fmt: skip

    rows: list[Any] = [
        request("a", "one"),
        request("b", "two FAIL"),
        {**request("c", "three"), "url": "/v1/embeddings"},
        b"{nope",
        request("d", "four", stream=True),
    ]
    inp = write_jsonl(tmp_path / "batch.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = run(BatchConfig(inp, out), FakeServer())
    assert (summary.format, summary.ok, summary.failed) == ("openai", 1, 4)
    by_id = {line["custom_id"]: line for line in read_out(out)}
    assert set(by_id) == {"a", "b", "c", "d", None}
    ok = by_id["a"]
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["request_id"] == "req-1"
    assert ok["response"]["body"]["choices"][0]["message"]["content"] == VALID
    rejected = by_id["b"]
    assert rejected["response"]["status_code"] == 400
    assert rejected["response"]["body"] == {"error": {"message": "rejected by the fake"}}
    assert rejected["error"]["code"] == "request_rejected"
    assert rejected["response"]["request_id"] == "req-f"  # the server's id, for its logs
    assert by_id["c"]["response"] is None and "'url' must be" in by_id["c"]["error"]["message"]
    assert by_id[None]["line"] == 4 and by_id[None]["error"]["code"] == "invalid_request"
    assert "stream" in by_id["d"]["error"]["message"]
    assert summary.prompt_tokens == 10  # usage from the pass-through body


def test_pass_through_goes_through_the_one_retry_layer(tmp_path: Path) -> None:
    answers = [httpx.Response(503), httpx.Response(429, headers={"retry-after": "0"})]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=MODELS)
        return answers.pop(0) if answers else httpx.Response(200, json=completion(VALID))

    row = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    summary = run(BatchConfig(write_jsonl(tmp_path / "b.jsonl", [row]), tmp_path / "out.jsonl"), handler)
    assert summary.ok == 1 and summary.requests == 1 and answers == []


def test_model_not_served_is_a_one_line_error(twenty: Path, tmp_path: Path) -> None:
    with pytest.raises(BatchError, match=r"does not serve 'other' \(it serves: endpoint-extractor\)"):
        run(BatchConfig(twenty, tmp_path / "out.jsonl"), FakeServer(), model="other")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.jsonl", "out.jsonl"], "INPUT missing.jsonl does not exist"),
        (["in.jsonl", "nowhere/out.jsonl"], "OUTPUT's folder nowhere does not exist"),
        (["in.jsonl", "in.jsonl"], "INPUT and OUTPUT are the same file"),
        (["in.jsonl", "."], "is a directory"),
        (["dup.jsonl", "out.jsonl"], "duplicate id 'x' on lines 1 and 2"),
        (["in.jsonl", "out.jsonl", "--format", "openai", "--id-field", "k"], "do not apply to OpenAI"),
    ],
)
def test_cli_bad_files_and_arguments(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    assert cli(["--base-url", "http://127.0.0.1:9/v1", "batch", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("client: error: ")
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["batch", "a", "b", "--concurrency", "0"])
    assert exit_.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err


def test_record_key_never_mixes_ids_and_line_numbers() -> None:
    assert Record(3, None).key == 3 and Record(3, 3).key == "3" and Record(3, "3").key == "3"


class DiesAfter(FakeServer):
    """Serves ``n`` extractions, then answers every request with ``status`` (or refuses it)."""

    def __init__(self, n: int, status: int | None = 503) -> None:
        super().__init__(fail="")
        self.n, self.down_status = n, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if len(self.sent) >= self.n:  # gone: the model list goes with it
            if self.down_status is None:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(self.down_status, headers={"retry-after": "0"})
        return super().__call__(request)


@pytest.mark.parametrize("down", [503, None])
def test_job_stops_when_the_server_goes_away_and_a_rerun_goes_on(
    down: int | None, twenty: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    job = BatchJob(BatchConfig(twenty, out, concurrency=1))

    async def go() -> None:
        transport = httpx.MockTransport(DiesAfter(7, down))
        async with AsyncEndpointClient("http://fake/v1", transport=transport, max_retries=1) as client:
            await job.run(client)

    with pytest.raises(ServerUnavailableError) as err:
        asyncio.run(go())
    assert err.value.server_down
    # What came back is kept; nothing is written for the records the server never answered.
    assert [line["id"] for line in read_out(out)] == [f"r{i}" for i in range(7)]
    assert job.summary.ok == 7 and job.summary.failed == 0
    summary = run(BatchConfig(twenty, out), FakeServer())
    assert (summary.skipped, summary.ok, summary.complete) == (7, 13, True)
    assert ids(read_out(out)) == Counter(f"r{i}" for i in range(20))


def test_a_500_on_one_record_fails_that_record_only(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    summary = run(BatchConfig(twenty, out), FakeServer(fail="endpoint 3", status=500), max_retries=0)
    assert (summary.ok, summary.failed, summary.complete) == (19, 1, True)


def test_cli_exits_75_when_no_server_answers(
    twenty: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    # Port 9 (discard) has nothing listening: connection refused at once.
    assert cli(["--base-url", "http://127.0.0.1:9/v1", "batch", str(twenty), str(out)]) == 75
    err = capsys.readouterr().err
    assert "cannot reach the server after" in err and "run the same command again to go on" in err
    assert not out.exists()


def test_cli_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["nope"], ["batch"], ["extract"], ["batch", "a", "b", "--format", "xml"]):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and "error: " in err, (argv, err)


def test_openai_batch_job_also_stops_when_the_server_goes_away(tmp_path: Path) -> None:
    rows = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "endpoint-extractor", "messages": [{"role": "user", "content": f"t{i}"}]}}
        for i in range(10)
    ]  # fmt: skip
    src, out = write_jsonl(tmp_path / "b.jsonl", rows), tmp_path / "out.jsonl"
    with pytest.raises(ServerUnavailableError):
        run(BatchConfig(src, out, concurrency=1), DiesAfter(4, None), max_retries=1)
    assert [line["custom_id"] for line in read_out(out)] == ["c0", "c1", "c2", "c3"]
    summary = run(BatchConfig(src, out), FakeServer())
    assert (summary.skipped, summary.ok, summary.complete) == (4, 6, True)


# -- a record's failure is the record's; only a server that is gone stops the job ----------------

NULL_MESSAGE = {**completion(VALID), "choices": [{"index": 0, "finish_reason": "stop", "message": None}]}
# 2xx answers that are not a chat completion, each of which once escaped as AttributeError,
# TypeError or ValueError and crashed the job on that record at every rerun.
BAD_2XX: dict[str, Any] = {
    "null message": NULL_MESSAGE,
    "null choices": {**completion(VALID), "choices": None},
    "null content": {
        **completion(VALID),
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None}}],
    },  # fmt: skip
    "text body": b"<html>It works!</html>",
    "list body": [1, 2],
    "empty body": b"",
}


class Garbage(FakeServer):
    """Answers ``answer`` with a 2xx for texts holding ``marker``; the rest like FakeServer."""

    def __init__(self, answer: Any, marker: str = "BAD", status: int = 200) -> None:
        super().__init__(fail="")
        self.answer, self.marker, self.answer_status = answer, marker, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/models") and self.marker in request.content.decode():
            self.sent.append("garbage")
            headers = {"x-request-id": "req-bad"}
            if isinstance(self.answer, bytes):
                return httpx.Response(self.answer_status, content=self.answer, headers=headers)
            return httpx.Response(self.answer_status, json=self.answer, headers=headers)
        return super().__call__(request)


def six(tmp_path: Path, bad: int = 2, marker: str = "BAD") -> Path:
    rows = [{"id": f"r{i}", "text": f"endpoint {i}" + (f" {marker}" if i == bad else "")} for i in range(6)]
    return write_jsonl(tmp_path / "in.jsonl", rows)


@pytest.mark.parametrize("answer", BAD_2XX.values(), ids=BAD_2XX.keys())
def test_a_malformed_2xx_fails_that_record_only_and_reruns_do_not_crash(answer: Any, tmp_path: Path) -> None:
    inp, out = six(tmp_path), tmp_path / "out.jsonl"
    summary = run(BatchConfig(inp, out, concurrency=3), Garbage(answer))
    assert (summary.ok, summary.failed, summary.complete) == (5, 1, True)
    [failed] = [line for line in read_out(out) if not line["ok"]]
    assert failed["id"] == "r2" and failed["error"]["message"]
    assert failed["error"]["type"] == "InvalidOutputError", failed["error"]
    again = run(BatchConfig(inp, out), Garbage(answer))
    assert (again.processed, again.complete) == (0, True)
    retried = run(BatchConfig(inp, out, retry_failed=True), Garbage(answer))
    assert (retried.failed, retried.output_ok, retried.output_failed) == (1, 5, 1)
    assert len(read_out(out)) == 6


def openai_rows(n: int, bad: int | None = None, marker: str = "BAD") -> list[dict[str, Any]]:
    return [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "endpoint-extractor",
                  "messages": [{"role": "user", "content": f"t{i}" + (f" {marker}" if i == bad else "")}]}}
        for i in range(n)
    ]  # fmt: skip


# A null content is a chat completion's own shape (a tool call has one): the pass-through keeps it.
BAD_COMPLETIONS = {name: answer for name, answer in BAD_2XX.items() if name != "null content"}


@pytest.mark.parametrize("answer", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_openai_batch_malformed_2xx_is_a_failure_line_with_the_request_id(
    answer: Any, tmp_path: Path
) -> None:
    inp, out = write_jsonl(tmp_path / "b.jsonl", openai_rows(4, bad=1)), tmp_path / "out.jsonl"
    summary = run(BatchConfig(inp, out), Garbage(answer))
    assert (summary.ok, summary.failed, summary.complete) == (3, 1, True)
    line = {line["custom_id"]: line for line in read_out(out)}["c1"]
    assert line["error"]["code"] == "invalid_output" and line["error"]["message"]
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"] == "req-bad"
    again = run(BatchConfig(inp, out, retry_failed=True), Garbage(answer))
    assert (again.failed, again.output_ok) == (1, 3)


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_an_odd_usage_block_does_not_crash_the_job(fmt: str, tmp_path: Path) -> None:
    answer = {**completion(VALID), "usage": {"prompt_tokens": "many", "completion_tokens": [1]}}
    rows = openai_rows(4, bad=1) if fmt == "openai" else [{"id": i, "text": f"t{i}" + (" BAD" if i == 1 else "")} for i in range(4)]  # fmt: skip
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    summary = run(BatchConfig(inp, out), Garbage(answer))
    assert (summary.processed, summary.complete) == (4, True)
    assert run(BatchConfig(inp, out, retry_failed=True), Garbage(answer)).complete


def test_an_unexpected_exception_is_that_records_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = AsyncEndpointClient.extract

    async def buggy(self: AsyncEndpointClient, text: str) -> Any:
        if "BAD" in text:
            raise KeyError("a bug in the client")
        return await real(self, text)

    monkeypatch.setattr(AsyncEndpointClient, "extract", buggy)
    inp, out = six(tmp_path), tmp_path / "out.jsonl"
    summary = run(BatchConfig(inp, out), FakeServer())
    assert (summary.ok, summary.failed, summary.complete) == (5, 1, True)
    [failed] = [line for line in read_out(out) if not line["ok"]]
    assert failed["id"] == "r2" and "KeyError" in failed["error"]["message"]


def test_failed_plain_lines_carry_the_request_id(tmp_path: Path) -> None:
    inp, out = six(tmp_path, marker="FAIL"), tmp_path / "out.jsonl"
    run(BatchConfig(inp, out), FakeServer())
    [failed] = [line for line in read_out(out) if not line["ok"]]
    assert failed["error"]["status_code"] == 400 and failed["error"]["request_id"] == "req-f"


def test_openai_batch_failure_after_retries_carries_the_request_id(tmp_path: Path) -> None:
    inp, out = write_jsonl(tmp_path / "b.jsonl", openai_rows(3, bad=0, marker="FAIL")), tmp_path / "out.jsonl"
    summary = run(BatchConfig(inp, out), FakeServer(status=500), max_retries=1)
    assert (summary.ok, summary.failed) == (2, 1)
    line = {line["custom_id"]: line for line in read_out(out)}["c0"]
    assert line["response"] == {
        "status_code": 500, "request_id": "req-f", "body": {"error": {"message": "rejected by the fake"}}
    }  # fmt: skip


def test_one_record_behind_a_504_fails_alone(tmp_path: Path) -> None:
    """A proxy's 504 for one slow record says nothing about the server: /models still answers."""
    server = FakeServer(fail="BAD", status=504)
    summary = run(BatchConfig(six(tmp_path), tmp_path / "out.jsonl"), server, max_retries=1)
    assert (summary.ok, summary.failed, summary.complete) == (5, 1, True)


def test_rate_limits_are_waited_out(tmp_path: Path) -> None:
    limited: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        text = request.content.decode()
        if not request.url.path.endswith("/models") and text not in limited:
            limited.add(text)
            return httpx.Response(429, headers={"retry-after": "0", "x-request-id": "r"})
        return FakeServer()(request)

    summary = run(BatchConfig(six(tmp_path), tmp_path / "out.jsonl", concurrency=2), handler)
    assert (summary.ok, summary.failed, summary.requests) == (6, 0, 6)


class RateLimitsAfter(DiesAfter):
    """Serves ``n`` extractions, then answers 429 to everything, /models included."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if len(self.sent) >= self.n:
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "slow down"}})
        return super().__call__(request)


def test_a_server_that_rate_limits_everything_stops_the_job(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(ServerUnavailableError):
        run(BatchConfig(twenty, out, concurrency=1), RateLimitsAfter(5), max_retries=1)
    assert [line["id"] for line in read_out(out)] == [f"r{i}" for i in range(5)]


def test_a_key_rejected_mid_job_stops_the_job(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(AuthenticationError):
        run(BatchConfig(twenty, out, concurrency=1), DiesAfter(4, 401))
    assert [line["id"] for line in read_out(out)] == [f"r{i}" for i in range(4)]


def behave_slow(marker: str, hang_after: int | None = None) -> Any:
    """Local-server behaviour: texts holding ``marker`` never get an answer; after ``hang_after``
    extractions, nothing does (the models list included)."""
    served = 0

    def behave(path: str, body: Any) -> Reply | str:
        nonlocal served
        if hang_after is not None and served >= hang_after:
            return HANG
        if path.endswith("/models"):
            return Reply(body=MODELS)
        if marker in body["messages"][-1]["content"]:
            return HANG if marker == "SLOW" else CLOSE
        served += 1
        return Reply(body=completion(VALID))

    return behave


def run_local(config: BatchConfig, behave: Any, **client_kwargs: Any) -> Summary:
    async def go(url: str) -> Summary:
        async with AsyncEndpointClient(url, **client_kwargs) as client:
            return await BatchJob(config).run(client)

    with local_server(behave) as server:
        return asyncio.run(go(server.base_url))


@pytest.mark.parametrize("marker", ["SLOW", "CLOSE"])
def test_a_record_that_times_out_or_drops_the_connection_fails_alone(marker: str, tmp_path: Path) -> None:
    inp, out = six(tmp_path, marker=marker), tmp_path / "out.jsonl"
    summary = run_local(BatchConfig(inp, out, concurrency=3), behave_slow(marker), timeout=0.5, max_retries=1)
    assert (summary.ok, summary.failed, summary.complete) == (5, 1, True)
    [failed] = [line for line in read_out(out) if not line["ok"]]
    assert failed["id"] == "r2"


def test_a_server_that_stops_answering_stops_the_job_and_a_rerun_goes_on(
    twenty: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(ServerUnavailableError):
        run_local(BatchConfig(twenty, out, concurrency=1), behave_slow("NEVER", hang_after=4), timeout=0.3, max_retries=0)  # fmt: skip
    assert [line["id"] for line in read_out(out)] == [f"r{i}" for i in range(4)]
    summary = run(BatchConfig(twenty, out), FakeServer())
    assert (summary.skipped, summary.ok, summary.complete) == (4, 16, True)


def test_stale_compaction_files_are_removed_and_live_ones_kept(twenty: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run(BatchConfig(twenty, out, limit=3), FakeServer())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.jsonl.{dead.pid}.compact"
        alive = tmp_path / f".out.jsonl.{live.pid}.compact"
        other = tmp_path / f".other.jsonl.{dead.pid}.compact"
        for path in (stale, alive, other):
            path.write_bytes(b'{"id": "r0", "ok": tr')
        summary = run(BatchConfig(twenty, out), FakeServer())
        assert summary.complete
        assert not stale.exists() and alive.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_an_openai_body_that_cannot_be_sent_as_json_fails_alone_as_a_bad_line(tmp_path: Path) -> None:
    """Python's JSON reader takes NaN, Infinity and lone surrogates; httpx's strict writer does not.
    They used to fail inside the send as 'unexpected ValueError/UnicodeEncodeError' (code 'error')."""
    row = {"custom_id": "", "method": "POST", "url": "/v1/chat/completions"}
    rows: list[Any] = [
        b'{"custom_id": "nan", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"messages": [], "temperature": NaN}}',
        b'{"custom_id": "inf", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"messages": [], "top_p": -Infinity}}',
        b'{"custom_id": "sur", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"messages": [{"role": "user", "content": "\\ud800"}]}}',
        {**row, "custom_id": "fine", "body": {"messages": [{"role": "user", "content": "x"}]}},
    ]
    inp = write_jsonl(tmp_path / "batch.jsonl", rows)
    out = tmp_path / "out.jsonl"
    server = FakeServer()
    summary = run(BatchConfig(inp, out), server)
    assert (summary.ok, summary.failed, summary.requests) == (1, 3, 1)
    by_id = {line["custom_id"]: line for line in read_out(out)}
    for bad in ("nan", "inf", "sur"):
        assert by_id[bad]["error"]["code"] == "invalid_request", by_id[bad]
        assert "cannot be sent as JSON" in by_id[bad]["error"]["message"]

"""``python -m client``: --version, --timeout, and the text ``extract`` sends from standard input or
a file. Against a real HTTP server on 127.0.0.1 (tests/local_server.py) that records what it was
sent and can hang; the real vLLM server runs the CLI in test_batch_e2e.py."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from client import AsyncEndpointClient, EndpointClient, build_messages
from client.__main__ import main as cli
from tests.local_server import HANG, MODELS, LocalServer, Reply, local_server
from tests.test_client_unit import VALID, completion

ROOT = Path(__file__).resolve().parent.parent


def answer(path: str, body: Any) -> Reply | str:
    if path.endswith("/models"):
        return Reply(body=MODELS)
    return HANG if "SLOW" in body["messages"][-1]["content"] else Reply(body=completion(VALID))


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server(answer) as running:
        yield running


def sent_as(text: str) -> str:
    """The user message the client builds for ``text``."""
    return build_messages(text)[-1]["content"]


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and "error: " in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    expected = f"endpoint-extractor {metadata.version('endpoint-extractor')}\n"
    with pytest.raises(SystemExit) as exit_:
        cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == expected
    proc = subprocess.run(
        [sys.executable, "-m", "client", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert (proc.returncode, proc.stdout) == (0, expected)


# What echo, printf and editors leave: one line ending at the end is dropped, nothing else.
TEXTS = [
    (b"Body height\n", "Body height"),  # echo
    (b"Body height", "Body height"),  # printf, no newline
    (b"a\n\n", "a\n"),
    (b"a\r\n", "a"),
    (b"a\r\n\r\n", "a\r\n"),
    (b"a\n\r\n", "a\n"),
    (b"  a  \t\n", "  a  \t"),
    (b"line 1\r\nline 2\n", "line 1\r\nline 2"),  # no newline translation
    (b"line 1\rline 2", "line 1\rline 2"),
    (b"\xef\xbb\xbfa\n", "a"),  # a byte-order mark
    ("Ösophagus — 5 µg\n".encode(), "Ösophagus — 5 µg"),
]


@pytest.mark.parametrize(("data", "text"), TEXTS)
@pytest.mark.parametrize("source", [["-"], ["--file", "-"], ["--file", "PATH"]])
def test_extract_sends_the_text_as_read(
    data: bytes,
    text: str,
    source: list[str],
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "text.txt"
    path.write_bytes(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    argv = [str(path) if arg == "PATH" else arg for arg in source]
    assert cli(["--base-url", server.base_url, "extract", *argv]) == 0, capsys.readouterr().err
    assert server.chat_texts() == [sent_as(text)]
    assert json.loads(capsys.readouterr().out)["endpoints"][0]["unit"] == "cm"


def test_extract_through_a_real_pipe(server: LocalServer) -> None:
    for shell, text in [
        ("echo 'Body height'", "Body height"),
        ("printf 'a\\n\\n'", "a\n"),
        ("printf 'a\\n'", "a"),
    ]:
        proc = subprocess.run(
            f"{shell} | {sys.executable} -m client --base-url {server.base_url} extract -",
            shell=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        assert server.chat_texts()[-1] == sent_as(text)


def test_the_text_argument_is_sent_as_given(server: LocalServer) -> None:
    assert cli(["--base-url", server.base_url, "extract", "a\n"]) == 0
    assert server.chat_texts() == [sent_as("a\n")]


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["-"], b"caf\xe9\n", "standard input is not valid UTF-8 (byte offset 3)"),
        (["--file", "missing.txt"], b"", "cannot read missing.txt: No such file or directory"),
        (["--file", "."], b"", "cannot read .: Is a directory"),
        (["-"], b"\n", "empty or whitespace only"),
        (["-"], b"", "empty or whitespace only"),
        (["-"], b"x" * 40, "standard input holds more than 32 bytes"),
    ],
)
def test_extract_bad_text_is_a_one_line_error(
    argv: list[str],
    stdin: bytes,
    message: str,
    server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("client.__main__.BATCH_MAX_LINE_BYTES", 32)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert cli(["--base-url", server.base_url, "extract", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and one_line_error(err), err
    assert server.chat_texts() == []


@pytest.mark.parametrize("argv", [[], ["text", "--file", "x"]])
def test_extract_needs_one_source(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli(["extract", *argv])
    assert exit_.value.code == 2 and one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf", "abc", "", "1e400"])
@pytest.mark.parametrize(
    "argv",
    [["extract", "x", "--timeout=V"], ["batch", "a", "b", "--timeout=V"], ["--timeout=V", "extract", "x"]],
)
def test_timeout_must_be_a_positive_number(
    value: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli([arg.replace("=V", f"={value}") for arg in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "expected a number of seconds > 0" in err and one_line_error(err), err


def test_extract_timeout_applies(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("client.__main__.EndpointClient", functools.partial(EndpointClient, max_retries=0))
    assert cli(["--base-url", server.base_url, "extract", "SLOW", "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "APITimeoutError" in err and one_line_error(err), err


def write_input(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_batch_timeout_fails_the_slow_record_only(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        "client.__main__.AsyncEndpointClient", functools.partial(AsyncEndpointClient, max_retries=1)
    )
    inp = write_input(tmp_path / "in.jsonl", ["a", "b SLOW", "c", "d"])
    out = tmp_path / "out.jsonl"
    argv = ["--base-url", server.base_url, "batch", str(inp), str(out), "--timeout", "0.3", "--no-progress"]
    assert cli(argv) == 1
    assert "batch complete: 3 ok, 1 failed" in capsys.readouterr().err
    lines = {line["id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert lines["r1"]["error"]["type"] == "APITimeoutError" and not lines["r1"]["ok"]
    assert all(lines[key]["ok"] for key in ("r0", "r2", "r3"))
    # The rerun skips everything: it neither redoes nor stops on the slow record.
    assert cli(argv) == 1 and "batch complete: 0 ok, 0 failed, 4 already done" in capsys.readouterr().err


def test_batch_exits_75_when_the_server_stops_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answered = 0

    def dies(path: str, body: Any) -> Reply | str:
        nonlocal answered
        if answered >= 3:
            return HANG
        if path.endswith("/models"):
            return Reply(body=MODELS)
        answered += 1
        return Reply(body=completion(VALID))

    monkeypatch.setattr(
        "client.__main__.AsyncEndpointClient", functools.partial(AsyncEndpointClient, max_retries=0)
    )
    inp = write_input(tmp_path / "in.jsonl", [f"t{i}" for i in range(10)])
    out = tmp_path / "out.jsonl"
    with local_server(dies) as hung:
        argv = [
            "--base-url",
            hung.base_url,
            "batch",
            str(inp),
            str(out),
            "--timeout",
            "0.3",
            "--concurrency",
            "1",
        ]
        assert cli([*argv, "--no-progress"]) == 75
    err = capsys.readouterr().err
    assert "run the same command again to go on" in err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r1", "r2"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--base-url", "ftp://x/v1"], {}, "not an http:// or https:// URL"),
        (["--base-url", "http://a/v1", "--base-url", "http://a/v1"], {}, "lists a server twice"),
        (["--api-key", ""], {}, "api_key must be a non-empty string"),
        (["--api-key", "sk-sécret"], {}, "api_key holds whitespace"),
        (["--model", " "], {}, "model must be a non-empty string"),
        ([], {"ENDPOINT_BASE_URL": "garbage"}, "not an http:// or https:// URL"),
        ([], {"ENDPOINT_API_KEY": "sk-secret\r"}, "ENDPOINT_API_KEY holds whitespace"),
    ],
    ids=["scheme", "twice", "empty-key", "non-ascii-key", "blank-model", "env-url", "env-key"],
)
@pytest.mark.parametrize("command", ["extract", "batch"])
def test_bad_client_options_are_a_one_line_error_and_exit_2(
    argv: list[str],
    env: dict[str, str],
    message: str,
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """They used to end in a ValueError traceback and exit 1, in both commands."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "text": "x"}\n')
    tail = ["extract", "Body height"] if command == "extract" else ["batch", str(inp), str(tmp_path / "o")]
    assert cli([*argv, *tail]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err) and message in err and "Traceback" not in err, err
    assert "secret" not in err and not (tmp_path / "o").exists()


def test_a_servers_multi_line_message_is_printed_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def behave(path: str, body: Any) -> Reply:
        return Reply(400, {"error": {"message": "bad request:\n  field x\n  field y"}})

    with local_server(behave) as server:
        assert cli(["--base-url", server.base_url, "extract", "Body height"]) == 1
    err = capsys.readouterr().err
    assert one_line_error(err) and "bad request: field x field y" in err, err

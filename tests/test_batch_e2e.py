"""Bulk jobs against the real vLLM server: a file with bad lines, a run capped halfway, a run
killed with SIGKILL mid-write, then resumed; --retry-failed; the OpenAI Batch format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from client import EndpointExtraction

pytestmark = pytest.mark.e2e
CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "corpus.jsonl"
GOOD = 26
BAD_LINES = [b"{not json at all", b'{"id": "bin", "text": "caf\xe9"}', b'{"id": "nul", "text": "a\x00"}']


def argv(server: Any, *args: str) -> list[str]:
    return [sys.executable, "-m", "client", "--base-url", server.base_url, "batch", *args, "--no-progress"]


def batch(server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(server, *args), capture_output=True, text=True, timeout=600)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def by_key(lines: list[dict[str, Any]], field: str = "id") -> Counter[Any]:
    return Counter(line[field] if line[field] is not None else ("line", line["line"]) for line in lines)


@pytest.fixture(scope="module")
def job_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()[:GOOD]]
    lines = [json.dumps({"id": row["id"], "text": row["text"]}).encode() for row in rows]
    lines += BAD_LINES + [json.dumps({"id": "empty", "text": "  "}).encode()]
    lines[5:5] = [json.dumps({"id": "no-text"}).encode()]  # a bad line in the middle
    path = tmp_path_factory.mktemp("batch") / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_capped_killed_and_resumed_job_writes_each_id_once(
    server: Any, job_input: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    expected_keys = Counter(
        {**{json.loads(line)["id"]: 1 for line in CORPUS.read_text().splitlines()[:GOOD]},
         "no-text": 1, "empty": 1, ("line", GOOD + 2): 1, ("line", GOOD + 3): 1, ("line", GOOD + 4): 1}
    )  # fmt: skip
    total = sum(expected_keys.values())

    capped = batch(server, str(job_input), str(out), "--concurrency", "4", "--limit", "10")
    assert capped.returncode in (0, 1), capped.stderr
    assert "stopped at --limit" in capped.stderr
    assert len(read(out)) == 10

    # Kill -9 halfway through a second run, then tear its last line as a crash mid-write would.
    proc = subprocess.Popen(
        argv(server, str(job_input), str(out), "--concurrency", "2"), stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while len(out.read_bytes().splitlines()) < 15 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = len(read(out))
    assert done < total, "the job finished before it could be killed"
    with out.open("ab") as f:
        f.write(b'{"id": "c0099", "line": 99, "ok": tr')

    resumed = batch(server, str(job_input), str(out), "--concurrency", "4")
    assert resumed.returncode == 1, resumed.stderr  # the bad lines failed
    assert "cut a torn last line" in resumed.stderr and "batch complete" in resumed.stderr
    assert f"{done} already done" in resumed.stderr
    lines = read(out)
    assert by_key(lines) == expected_keys
    ok = [line for line in lines if line["ok"]]
    failed = {line["id"] or line["line"]: line["error"] for line in lines if not line["ok"]}
    assert len(ok) == GOOD
    for line in ok:
        EndpointExtraction.model_validate(line["extraction"])
    assert set(failed) == {"no-text", "empty", GOOD + 2, GOOD + 3, GOOD + 4}
    assert failed["empty"]["type"] == "InvalidInputError" and "empty" in failed["empty"]["message"]
    assert "invalid JSON" in failed[GOOD + 2]["message"] and "UTF-8" in failed[GOOD + 3]["message"]
    assert "NUL" in failed[GOOD + 4]["message"]

    # A --retry-failed run killed while compacting left its temporary file: the next job removes it.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out.with_name(f".{out.name}.{dead.pid}.compact")
    stale.write_bytes(out.read_bytes()[:100])
    retried = batch(server, str(job_input), str(out), "--retry-failed")
    assert retried.returncode == 1 and "0 ok, 5 failed, 26 already done" in retried.stderr, retried.stderr
    assert by_key(read(out)) == expected_keys
    assert not stale.exists() and f"removed {stale.name}" in retried.stderr


def test_openai_batch_file_runs_unchanged(server: Any, tmp_path: Path) -> None:
    from client import build_messages

    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()[:4]]
    rows = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "endpoint-extractor", "messages": build_messages(text), "max_tokens": 512}}
        for i, text in enumerate(texts)
    ]  # fmt: skip
    rows[3]["body"]["max_tokens"] = 100_000  # over the server's cap: a 400 answer, recorded
    inp = tmp_path / "batch.jsonl"
    inp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    proc = batch(server, str(inp), str(out))
    assert proc.returncode == 1, proc.stderr
    lines = {line["custom_id"]: line for line in read(out)}
    assert set(lines) == {"req-0", "req-1", "req-2", "req-3"}
    # The server's x-request-id, on success and failure lines alike, each its own.
    request_ids = {line["response"]["request_id"] for line in lines.values()}
    assert len(request_ids) == 4 and all(isinstance(rid, str) and rid for rid in request_ids)
    for key in ("req-0", "req-1", "req-2"):
        response = lines[key]["response"]
        assert response["status_code"] == 200 and lines[key]["error"] is None
        EndpointExtraction.model_validate_json(response["body"]["choices"][0]["message"]["content"])
    assert lines["req-3"]["response"]["status_code"] == 400
    assert "exceeds this server's cap" in lines["req-3"]["error"]["message"]

"""Resumable bulk jobs: ``python -m client batch INPUT OUTPUT``.

INPUT is JSONL or CSV with an id and a text per record (``--id-field``, ``--text-field``), or an
OpenAI Batch API file (``custom_id``/``method``/``url``/``body`` per line), as OpenAI and
``vllm run-batch`` take it. OUTPUT is JSONL with one line per input record, in completion order:

- JSONL or CSV input: ``{"id", "line", "ok", "extraction", "error"}``;
- OpenAI Batch input: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
  "error"}``, the Batch API's own output format; the body goes to the server as it is.

Exactly once. A result line is written whole and flushed as soon as its result arrives (fsynced
every second and at the end), so a restarted job skips the ids OUTPUT already holds; a last line
torn by a crash is cut off first and its record redone. Failed records are written with their
error. ``--retry-failed`` reruns only those: their new lines are appended (the last line for an id
wins) and the file is then compacted, rewritten atomically to hold one line per id. A job that
dies mid-compaction leaves the old file whole; the next run compacts it.

A record's failure is that record's only: an error answer, a malformed answer, a timeout, a dropped
connection, even a bug (any exception) is written as that record's failure and the job goes on. A
server that is gone is not a record's failure: when a record fails for want of a server
(ServerUnavailableError: refused, timed out, 5xx or 429 through every retry), the job asks the
server for its model list; if that fails too, the job stops there with that ServerUnavailableError,
keeping every result that came back, and the same command run again goes on. A rejected key
(AuthenticationError) or a closed client stops the job as well.

A job killed while compacting leaves its temporary ``.OUTPUT.<pid>.compact`` beside OUTPUT; the next
job removes those of processes that are gone.

Memory stays bounded by the ids: INPUT is streamed twice (a pre-pass that rejects duplicate ids
and counts the work, then the job), and at most ``concurrency`` records are in flight.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from client._base_client import _unexpected
from client._batch_input import (
    DETECT_LINES,
    FORMATS,
    OPENAI_URL,
    InputFormat,
    Key,
    Record,
    _csv_records,
    _json_records,
    detect_format,
)
from client._batch_output import (
    _open_locked,
    _Writer,
    compact,
    load_output,
    remove_stale_compactions,
    repair_tail,
)
from client._batch_results import _batch_id, _error_json, _openai_call, _openai_failure
from client._client import AsyncEndpointClient
from client._constants import BATCH_MAX_CONCURRENCY, DEFAULT_CONCURRENCY
from client._exceptions import (
    AuthenticationError,
    BatchError,
    ClientClosedError,
    EndpointError,
    ServerUnavailableError,
)

# The names this module has always offered; the input, output and result-line parts live in
# _batch_input.py, _batch_output.py and _batch_results.py.
__all__ = [
    "DETECT_LINES",
    "FORMATS",
    "OPENAI_URL",
    "BatchConfig",
    "BatchJob",
    "InputFormat",
    "Key",
    "Record",
    "Summary",
    "compact",
    "detect_format",
    "iter_records",
    "load_output",
    "remove_stale_compactions",
    "repair_tail",
    "run_batch",
]


@dataclass(frozen=True)
class BatchConfig:
    input: Path
    output: Path
    format: str = "auto"
    id_field: str = "id"
    text_field: str = "text"
    concurrency: int = DEFAULT_CONCURRENCY
    retry_failed: bool = False
    # Process at most this many records in this run; a later run goes on from there.
    limit: int | None = None
    progress: bool = False

    def check(self) -> None:
        if self.format not in FORMATS:
            raise BatchError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if not 1 <= self.concurrency <= BATCH_MAX_CONCURRENCY:
            raise BatchError(f"--concurrency must be between 1 and {BATCH_MAX_CONCURRENCY}")
        if self.limit is not None and self.limit < 1:
            raise BatchError("--limit must be at least 1")
        if not self.id_field or not self.text_field:
            raise BatchError("--id-field and --text-field must not be empty")
        if not self.input.is_file():
            why = "is a directory" if self.input.is_dir() else "does not exist"
            raise BatchError(f"INPUT {self.input} {why}")
        if not os.access(self.input, os.R_OK):
            raise BatchError(f"INPUT {self.input} is not readable")
        if self.output.is_dir():
            raise BatchError(f"OUTPUT {self.output} is a directory; give a file path")
        if not self.output.parent.is_dir():
            raise BatchError(f"OUTPUT's folder {self.output.parent} does not exist")
        if self.output.exists() and os.path.samefile(self.input, self.output):
            raise BatchError("INPUT and OUTPUT are the same file")


@dataclass
class Summary:
    format: str = ""
    total: int = 0  # records in INPUT
    skipped: int = 0  # already done before this run
    ok: int = 0  # this run
    failed: int = 0  # this run
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    output_ok: int = 0  # what OUTPUT holds for INPUT's records after this run
    output_failed: int = 0
    foreign: int = 0  # OUTPUT lines whose id is not in INPUT (kept as they are)
    complete: bool = False  # every record of INPUT has a line in OUTPUT
    interrupted: bool = False

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def rate(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        state = "interrupted" if self.interrupted else "complete" if self.complete else "stopped at --limit"
        text = (
            f"batch {state}: {self.ok} ok, {self.failed} failed, {self.skipped} already done"
            f" | {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens"
            f" in {self.requests} requests | {self.elapsed_s:.1f} s, {self.rate:.2f} extractions/s"
            f" | OUTPUT holds {self.output_ok} ok, {self.output_failed} failed of {self.total}"
        )
        if self.output_failed:
            text += " (--retry-failed reruns the failures)"
        if self.foreign:
            text += f"; {self.foreign} OUTPUT lines have ids not in INPUT"
        return text


def iter_records(config: BatchConfig, fmt: InputFormat) -> Iterator[Record]:
    if fmt == "csv":
        return _csv_records(config.input, config.id_field, config.text_field)
    return _json_records(config.input, fmt, config.id_field, config.text_field)


class BatchJob:
    """One run of a bulk job. ``await BatchJob(config).run(client)``; ``summary`` is kept up to date
    while it runs, so an interrupted run still reports what it did."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self.summary = Summary()
        self._latest: dict[Key, bool] = {}
        self._rewrote = False  # appended a line for a key OUTPUT already had: compact at the end
        self._bar: tqdm[Any] | None = None

    async def run(self, client: AsyncEndpointClient) -> Summary:
        cfg = self.config
        cfg.check()
        fmt = detect_format(cfg.input, cfg.format)
        if fmt == "openai" and (cfg.id_field, cfg.text_field) != ("id", "text"):
            raise BatchError("--id-field and --text-field do not apply to OpenAI Batch files")
        self.summary.format = fmt
        # OUTPUT is created only once INPUT and the server have passed their checks.
        out = _open_locked(cfg.output) if cfg.output.exists() else None
        try:
            superseded = 0
            if out is not None:
                self._remove_stale(cfg.output)
                repaired = repair_tail(cfg.output, fmt)
                if repaired:
                    print(f"batch: cut a torn last line ({repaired} bytes) off {cfg.output}", file=sys.stderr)
                self._latest, superseded = load_output(cfg.output, fmt)
            keys, stale = self._prescan(fmt)
            await self._check_server(client, fmt)
            if out is None:
                out = _open_locked(cfg.output)
                if out.tell() != 0:
                    raise BatchError(f"OUTPUT {cfg.output} appeared while this job started; another job?")
                self._remove_stale(cfg.output)
            elif superseded or stale:
                compact(cfg.output, fmt, frozenset(stale))
                for key in stale:
                    del self._latest[key]
                out.close()  # compaction replaced the file: append to the new one
                out = _open_locked(cfg.output)
            todo = sum(1 for key in keys if self._wanted(key))
            s = self.summary
            s.total, s.skipped = len(keys), len(keys) - todo
            s.foreign = sum(1 for key in self._latest if key not in keys)
            try:
                await self._process(client, fmt, out, min(todo, cfg.limit or todo))
            finally:
                self._tally(keys)
                if self._rewrote:
                    compact(cfg.output, fmt)
        finally:
            if out is not None:
                out.close()
        return self.summary

    @staticmethod
    def _remove_stale(output: Path) -> None:
        for path in remove_stale_compactions(output):
            print(f"batch: removed {path.name}, left by a job killed while compacting", file=sys.stderr)

    def _prescan(self, fmt: InputFormat) -> tuple[set[Key], set[Key]]:
        """All input keys (duplicates rejected), and the id-less failures in OUTPUT whose input line
        now has an id (the line was fixed): those are stale."""
        first: dict[Key, int] = {}
        stale: set[Key] = set()
        duplicates: list[tuple[Key, int, int]] = []
        for record in iter_records(self.config, fmt):
            key = record.key
            if key in first:
                duplicates.append((key, first[key], record.line))
                continue
            first[key] = record.line
            if record.id is not None and record.line in self._latest:
                stale.add(record.line)
        if duplicates:
            key, a, b = duplicates[0]
            more = f" (and {len(duplicates) - 1} more)" if len(duplicates) > 1 else ""
            name = "custom_id" if fmt == "openai" else self.config.id_field
            raise BatchError(
                f"INPUT {self.config.input} has duplicate {name} {key!r} on lines {a} and {b}{more}; "
                "ids must be unique"
            )
        return set(first), stale

    def _wanted(self, key: Key) -> bool:
        done = self._latest.get(key)
        return done is None or (self.config.retry_failed and not done)

    async def _check_server(self, client: AsyncEndpointClient, fmt: InputFormat) -> None:
        try:
            models = await client.served_models()
        except EndpointError:
            raise
        except Exception as exc:  # an answer nobody foresaw: still one line, still in the hierarchy
            raise BatchError(
                f"cannot read the model list of {client.base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if fmt != "openai" and client.model not in models:
            where = f"the server at {client.base_url}"
            if len(client.base_urls) > 1:
                where = f"a server of {', '.join(client.base_urls)}"
            raise BatchError(
                f"{where} does not serve {client.model!r} "
                f"(it serves: {', '.join(models) or 'nothing'}); pass --model"
            )

    async def _process(
        self, client: AsyncEndpointClient, fmt: InputFormat, out: IO[bytes], todo: int
    ) -> None:
        cfg = self.config
        start = time.perf_counter()
        usage0 = (client.usage.requests, client.usage.prompt_tokens, client.usage.completion_tokens)
        writer = _Writer(out)
        bar = self._bar = tqdm(
            total=todo, unit="item", desc="batch", disable=not cfg.progress, file=sys.stderr
        )
        window: set[asyncio.Task[tuple[Key, dict[str, Any], bool]]] = set()

        def finish(task: asyncio.Task[tuple[Key, dict[str, Any], bool]]) -> None:
            window.discard(task)
            self._write(writer, *task.result())

        try:
            submitted = 0
            for record in iter_records(cfg, fmt):
                if not self._wanted(record.key):
                    continue
                if submitted == todo:
                    break
                submitted += 1
                if record.problem is not None:
                    self._write(writer, record.key, self._problem_line(record, fmt), False)
                    continue
                window.add(asyncio.create_task(self._one(client, fmt, record)))
                if len(window) >= cfg.concurrency:
                    done, _ = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        finish(task)
            while window:
                done, _ = await asyncio.wait(window, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    finish(task)
        finally:
            # Interrupted: keep what already came back, drop what is still in flight (redone later).
            for task in list(window):
                if task.done() and not task.cancelled() and task.exception() is None:
                    finish(task)
                else:
                    task.cancel()
            if window:
                await asyncio.gather(*window, return_exceptions=True)
            await writer.sync()
            bar.close()
            s = self.summary
            s.elapsed_s = time.perf_counter() - start
            s.requests = client.usage.requests - usage0[0]
            s.prompt_tokens = client.usage.prompt_tokens - usage0[1]
            s.completion_tokens = client.usage.completion_tokens - usage0[2]

    def _write(self, writer: _Writer, key: Key, line: dict[str, Any], ok: bool) -> None:
        writer.write(line)
        if key in self._latest:
            self._rewrote = True
        self._latest[key] = ok
        if ok:
            self.summary.ok += 1
        else:
            self.summary.failed += 1
        if self._bar is not None:
            self._bar.set_postfix(ok=self.summary.ok, failed=self.summary.failed, refresh=False)
            self._bar.update(1)

    def _tally(self, keys: set[Key]) -> None:
        s = self.summary
        outcomes = [self._latest[key] for key in keys if key in self._latest]
        s.output_ok = sum(outcomes)
        s.output_failed = len(outcomes) - s.output_ok
        s.complete = len(outcomes) == len(keys)

    async def _one(
        self, client: AsyncEndpointClient, fmt: InputFormat, record: Record
    ) -> tuple[Key, dict[str, Any], bool]:
        """The record's result line, a failure included; raises only what stops the job."""
        try:
            if fmt == "openai":
                return record.key, await _openai_call(client, record), True
            assert record.text is not None
            value = (await client.extract(record.text)).model_dump(mode="json")
        except Exception as exc:  # every failure of a record is the record's, unless the job must stop
            error = await _record_error(client, exc)
            if fmt == "openai":
                return record.key, _openai_failure(record, error), False
            line = {"id": record.id, "line": record.line, "ok": False, "extraction": None, "error": _error_json(error)}  # fmt: skip
            return record.key, line, False
        line = {"id": record.id, "line": record.line, "ok": True, "extraction": value, "error": None}
        return record.key, line, True

    @staticmethod
    def _problem_line(record: Record, fmt: InputFormat) -> dict[str, Any]:
        assert record.problem is not None
        if fmt == "openai":
            line: dict[str, Any] = {
                "id": _batch_id(),
                "custom_id": record.id,
                "response": None,
                "error": {"code": "invalid_request", "message": record.problem},
            }
            if record.id is None:
                line["line"] = record.line
            return line
        error = {"type": "InvalidInputError", "message": record.problem}
        return {"id": record.id, "line": record.line, "ok": False, "extraction": None, "error": error}


async def _record_error(client: AsyncEndpointClient, exc: Exception) -> EndpointError:
    """The error to write for a record that failed with ``exc``; raises instead what stops the job:
    a rejected key, a closed client, or a server that is gone. A record can fail for want of a
    server on its own (it times out, its connection drops, a proxy answers 504 for it): the job
    stops only if the server does not answer its model list either. Then this record is not
    written, and the next run redoes it."""
    if not isinstance(exc, EndpointError):
        return _unexpected(exc)
    if isinstance(exc, (AuthenticationError, ClientClosedError)):
        raise exc
    if isinstance(exc, ServerUnavailableError):
        try:
            await client.served_models()
        except (ServerUnavailableError, AuthenticationError, ClientClosedError):
            raise
        except Exception:  # it answered, if oddly: the server is there
            pass
    return exc


async def run_batch(config: BatchConfig, client: AsyncEndpointClient) -> Summary:
    """Run a bulk job to its end (or its --limit) with ``client``; the summary of this run."""
    return await BatchJob(config).run(client)

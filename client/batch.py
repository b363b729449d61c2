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
import codecs
import contextlib
import csv
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal

from tqdm import tqdm

from client._client import AsyncEndpointClient, _unexpected
from client._constants import (
    BATCH_FSYNC_INTERVAL,
    BATCH_MAX_CONCURRENCY,
    BATCH_MAX_LINE_BYTES,
    DEFAULT_CONCURRENCY,
)
from client._exceptions import (
    APITimeoutError,
    AuthenticationError,
    BatchError,
    ClientClosedError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RateLimitError,
    RequestRejectedError,
    ServerUnavailableError,
)

InputFormat = Literal["jsonl", "csv", "openai"]
FORMATS: tuple[str, ...] = ("auto", "jsonl", "csv", "openai")
OPENAI_URL = "/v1/chat/completions"
# A record's key: its id as a string or, when it has no usable id, its line number.
Key = str | int
# How many lines --format auto reads to tell plain JSONL from an OpenAI Batch file.
DETECT_LINES = 100

# The most specific class in an error's MRO names its code.
_ERROR_CODES: dict[type[EndpointError], str] = {
    InvalidInputError: "invalid_request",
    AuthenticationError: "authentication_error",
    RequestRejectedError: "request_rejected",
    RateLimitError: "rate_limit_exceeded",
    APITimeoutError: "timeout",
    ServerUnavailableError: "server_unavailable",
    OutputTruncatedError: "output_truncated",
    InvalidOutputError: "invalid_output",
}


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


@dataclass(frozen=True)
class Record:
    """One input record. ``problem`` says why it cannot be sent: it fails without a request."""

    line: int
    id: str | int | None
    text: str | None = None
    body: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def key(self) -> Key:
        return self.line if self.id is None else str(self.id)


# -- reading INPUT ---------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, problem)`` for each non-blank line of a UTF-8 file, read in bounded
    pieces; a line that is too long, holds NUL bytes or is not UTF-8 comes with a problem instead."""
    with path.open("rb") as f:
        number = 0
        while raw := f.readline(BATCH_MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > BATCH_MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(BATCH_MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield number, None, f"line {number}: longer than {BATCH_MAX_LINE_BYTES} bytes"
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if b"\x00" in raw:
                yield number, None, f"line {number}: contains NUL bytes"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"line {number}: not valid UTF-8 (byte offset {exc.start})"
                continue
            if text.strip():
                yield number, text, None


def _json_object(number: int, text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"line {number}: invalid JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(value, dict):
        return None, f"line {number}: expected a JSON object, got {type(value).__name__}"
    return value, None


def _usable_id(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(value.strip()))


def _jsonl_record(number: int, obj: dict[str, Any], id_field: str, text_field: str) -> Record:
    ident = obj.get(id_field)
    if not _usable_id(ident):
        why = "no" if ident is None else "an unusable"
        return Record(
            number, None, problem=f"line {number}: {why} {id_field!r} field (a string or an integer)"
        )
    text = obj.get(text_field)
    if not isinstance(text, str):
        why = f"no {text_field!r} field" if text is None else f"{text_field!r} is not a string"
        return Record(number, ident, problem=f"line {number}: {why}")
    return Record(number, ident, text=text)


def _openai_record(number: int, obj: dict[str, Any]) -> Record:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Record(number, None, problem=f"line {number}: no 'custom_id' string")
    body = obj.get("body")
    if obj.get("method") != "POST":
        problem = "'method' must be POST"
    elif obj.get("url") != OPENAI_URL:
        problem = f"'url' must be {OPENAI_URL} (got {obj.get('url')!r})"
    elif not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        problem = "'body' must be an object with 'messages'"
    elif body.get("stream"):
        problem = "streaming requests cannot be batched"
    elif not _sendable(body):
        problem = "'body' holds NaN, Infinity or a lone surrogate: it cannot be sent as JSON"
    else:
        return Record(number, custom_id, body=body)
    return Record(number, custom_id, problem=f"line {number}: {problem}")


def _sendable(body: dict[str, Any]) -> bool:
    """Whether httpx can send ``body`` as JSON: Python's decoder takes what its encoder (strict, as
    httpx uses it) refuses."""
    try:
        json.dumps(body, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def _json_records(path: Path, fmt: InputFormat, id_field: str, text_field: str) -> Iterator[Record]:
    for number, text, problem in _lines(path):
        if text is None:
            yield Record(number, None, problem=problem)
            continue
        obj, problem = _json_object(number, text)
        if obj is None:
            yield Record(number, None, problem=problem)
        elif fmt == "openai":
            yield _openai_record(number, obj)
        else:
            yield _jsonl_record(number, obj, id_field, text_field)


def _bad_cell(cell: str) -> str | None:
    if "\x00" in cell:
        return "contains NUL bytes"
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:  # surrogateescape turned undecodable bytes into lone surrogates
        return "not valid UTF-8"
    return None


def _csv_records(path: Path, id_field: str, text_field: str) -> Iterator[Record]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise BatchError(f"INPUT {path}: unreadable CSV header: {exc}") from None
        if header is None:
            return
        for name in (id_field, text_field):
            if header.count(name) != 1:
                how = "no" if name not in header else "more than one"
                raise BatchError(
                    f"INPUT {path}: the CSV header has {how} column {name!r} "
                    f"(columns: {', '.join(header)}); pass --id-field/--text-field"
                )
        id_col, text_col = header.index(id_field), header.index(text_field)
        while True:
            number = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Record(number, None, problem=f"line {number}: {exc}")
                continue
            if not any(cell.strip() for cell in row):
                continue
            ident = row[id_col] if id_col < len(row) else ""
            why = _bad_cell(ident) if ident.strip() else "is empty"
            if why is not None:
                yield Record(number, None, problem=f"line {number}: {id_field!r} {why}")
            elif text_col >= len(row):
                yield Record(number, ident, problem=f"line {number}: no {text_field!r} value")
            elif (why := _bad_cell(row[text_col])) is not None:
                yield Record(number, ident, problem=f"line {number}: {text_field!r} {why}")
            else:
                yield Record(number, ident, text=row[text_col])


def detect_format(path: Path, requested: str = "auto") -> InputFormat:
    """The input format: as given, else ``.csv`` by name, else JSONL or OpenAI Batch by the first
    JSON object among the first lines."""
    if requested in ("jsonl", "csv", "openai"):
        return requested  # type: ignore[return-value]
    if path.suffix.lower() == ".csv":
        return "csv"
    seen = False
    for number, text, _ in islice(_lines(path), DETECT_LINES):
        seen = True
        obj, _ = _json_object(number, text) if text is not None else (None, None)
        if obj is not None:
            return "openai" if {"custom_id", "body"} <= obj.keys() else "jsonl"
    if seen:
        raise BatchError(
            f"INPUT {path} does not look like JSONL: none of its first {DETECT_LINES} lines is a JSON "
            "object; pass --format csv for CSV (or --format jsonl to go on anyway)"
        )
    return "jsonl"


def iter_records(config: BatchConfig, fmt: InputFormat) -> Iterator[Record]:
    if fmt == "csv":
        return _csv_records(config.input, config.id_field, config.text_field)
    return _json_records(config.input, fmt, config.id_field, config.text_field)


# -- OUTPUT: repair, resume state, compaction --------------------------------------------------


def _output_key(obj: dict[str, Any], fmt: InputFormat) -> Key | None:
    ident = obj.get("custom_id") if fmt == "openai" else obj.get("id")
    if ident is None:
        line = obj.get("line")
        return line if isinstance(line, int) and not isinstance(line, bool) else None
    return str(ident) if _usable_id(ident) else None


def _output_ok(obj: dict[str, Any], fmt: InputFormat) -> bool:
    if fmt == "openai":
        response = obj.get("response")
        return obj.get("error") is None and isinstance(response, dict) and response.get("status_code") == 200
    return obj.get("ok") is True


def _parse_output_line(raw: bytes, fmt: InputFormat) -> tuple[Key, bool] | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or ("custom_id" if fmt == "openai" else "ok") not in obj:
        return None
    key = _output_key(obj, fmt)
    return None if key is None else (key, _output_ok(obj, fmt))


def repair_tail(path: Path, fmt: InputFormat) -> int:
    """Cut off what a crash left at the end of OUTPUT: an unterminated last line, or a last line that
    is not a result (a block of NULs after a power loss). Returns the number of bytes removed."""
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = _last_newline_end(f, size)
        if end > 0:
            start = _last_newline_end(f, end - 1)
            f.seek(start)
            if _parse_output_line(f.read(end - start), fmt) is None:
                end = start
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        return size - end


def _last_newline_end(f: IO[bytes], end: int) -> int:
    """The offset just after the last newline before ``end`` (0 when there is none)."""
    chunk = 1 << 16
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        found = f.read(pos - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        pos = start
    return 0


def load_output(path: Path, fmt: InputFormat) -> tuple[dict[Key, bool], int]:
    """The latest outcome (ok or not) per key, and how many lines are superseded by later ones."""
    latest: dict[Key, bool] = {}
    lines = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            parsed = _parse_output_line(raw, fmt)
            if parsed is None:
                kind = "an OpenAI Batch" if fmt == "openai" else "a client batch"
                raise BatchError(
                    f"OUTPUT {path} line {number} is not {kind} result line; "
                    "was it written for another INPUT or format? Move it aside or pick another OUTPUT"
                )
            latest[parsed[0]] = parsed[1]
            lines += 1
    return latest, lines - len(latest)


def _compaction_file(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.compact")


def remove_stale_compactions(path: Path) -> list[Path]:
    """Remove the compaction files of OUTPUT that processes now gone left behind (killed while
    compacting); a live process's file is never touched. Returns what was removed."""
    if os.name != "posix":  # no cheap liveness check by pid: leave them
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([0-9]+)\.compact")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))) or not entry.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def compact(path: Path, fmt: InputFormat, drop: frozenset[Key] = frozenset()) -> None:
    """Rewrite OUTPUT atomically with only the last line of each key, leaving out ``drop``."""
    last: dict[Key, int] = {}
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            parsed = _parse_output_line(raw, fmt)
            if parsed is not None:
                last[parsed[0]] = index
    keep = {index for key, index in last.items() if key not in drop}
    tmp = _compaction_file(path, os.getpid())
    try:
        with path.open("rb") as src, tmp.open("wb") as dst:
            for index, raw in enumerate(src):
                if index in keep:
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_locked(path: Path) -> IO[bytes]:
    """OUTPUT opened for appending, under an exclusive lock, so two jobs never write one file."""
    f = path.open("ab")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the user keeps jobs apart
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another job's compaction may have replaced the file between our open and our lock.
        if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
            raise BlockingIOError
    except BlockingIOError:
        f.close()
        raise BatchError(f"OUTPUT {path} is in use by another batch job") from None
    return f


# -- the job ---------------------------------------------------------------------------------


def _dumps(obj: dict[str, Any]) -> bytes:
    # default=str: a value JSON cannot hold (bytes in an error body) must not fail the job.
    try:
        return json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape in INPUT: keep it escaped
        return json.dumps(obj, default=str).encode("ascii")


def _error_json(exc: EndpointError) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for name in ("status_code", "request_id", "raw"):
        value = getattr(exc, name, None)
        if value is not None:
            out[name] = value
    return out


def _error_code(exc: EndpointError) -> str:
    return next((_ERROR_CODES[cls] for cls in type(exc).__mro__ if cls in _ERROR_CODES), "error")


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


def _batch_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def _openai_failure(record: Record, exc: EndpointError) -> dict[str, Any]:
    """The Batch API's line for a request that failed; ``response`` where the server answered."""
    response = None
    if exc.status_code is not None:
        response = {"status_code": exc.status_code, "request_id": exc.request_id, "body": exc.body}
    error = {"code": _error_code(exc), "message": str(exc)}
    return {"id": _batch_id(), "custom_id": record.id, "response": response, "error": error}


def _completion_problem(payload: object) -> str | None:
    """Why a 2xx body is not a chat completion; None when it is one. Only the shape every reader of
    the Batch output relies on is checked: the body goes to OUTPUT as the server sent it."""
    if not isinstance(payload, dict):
        return f"the answer is JSON {type(payload).__name__}, not a chat completion object"
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        return "the answer has no choices"
    for index, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return f"the answer's choice {index} has no message"
    return None


async def _openai_call(client: AsyncEndpointClient, record: Record) -> dict[str, Any]:
    """One OpenAI Batch request, sent as it is; the line the Batch API writes for it. A 2xx that
    is not a chat completion raises InvalidOutputError."""
    assert record.body is not None
    http, payload = await client._post_chat(record.body)
    problem = _completion_problem(payload)
    if problem is not None:
        raise InvalidOutputError(problem, raw=http.text, response=http, body=payload)
    response = {
        "status_code": http.status_code,
        "request_id": http.headers.get("x-request-id"),
        "body": payload,
    }
    return {"id": _batch_id(), "custom_id": record.id, "response": response, "error": None}


@dataclass
class _Writer:
    """Appends whole lines: one write and a flush per line, so a crash of the process can tear only
    the last one. The fsync (against a crash of the machine) runs in a thread every
    BATCH_FSYNC_INTERVAL, so a slow disk does not stall the event loop and the requests in flight."""

    file: IO[bytes]
    synced: float = field(default_factory=time.monotonic)
    pending: asyncio.Future[None] | None = None

    def write(self, line: dict[str, Any]) -> None:
        self.file.write(_dumps(line) + b"\n")
        self.file.flush()
        if self.pending is not None and self.pending.done():
            self.pending.result()  # an fsync that failed fails the job here
            self.pending = None
        now = time.monotonic()
        if self.pending is None and now - self.synced >= BATCH_FSYNC_INTERVAL:
            self.synced = now
            self.pending = asyncio.get_running_loop().run_in_executor(None, os.fsync, self.file.fileno())

    async def sync(self) -> None:
        if self.pending is not None:
            await self.pending
            self.pending = None
        self.file.flush()
        os.fsync(self.file.fileno())


async def run_batch(config: BatchConfig, client: AsyncEndpointClient) -> Summary:
    """Run a bulk job to its end (or its --limit) with ``client``; the summary of this run."""
    return await BatchJob(config).run(client)

"""Reading a bulk job's INPUT (``client/batch.py``): its records, one per non-blank line or CSV row.

A line that cannot be a record (too long, not UTF-8, not a JSON object, no id or text, an OpenAI
Batch request this server cannot take) becomes a record with a ``problem``: that record fails on
its own, without a request, and the rest of the file is read on.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from client._constants import BATCH_MAX_LINE_BYTES
from client._exceptions import BatchError

InputFormat = Literal["jsonl", "csv", "openai"]
FORMATS: tuple[str, ...] = ("auto", "jsonl", "csv", "openai")
OPENAI_URL = "/v1/chat/completions"
# A record's key: its id as a string or, when it has no usable id, its line number.
Key = str | int
# How many lines --format auto reads to tell plain JSONL from an OpenAI Batch file.
DETECT_LINES = 100


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

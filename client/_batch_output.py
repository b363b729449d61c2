"""A bulk job's OUTPUT file (``client/batch.py``): appending result lines, and what a restarted
job reads back from it.

Lines are appended whole under an exclusive lock; a torn last line is cut off, the latest line per
id says whether that record is done, and compaction rewrites the file atomically to one line per id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from client._batch_input import InputFormat, Key, _usable_id
from client._constants import BATCH_FSYNC_INTERVAL
from client._exceptions import BatchError


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


def _dumps(obj: dict[str, Any]) -> bytes:
    # default=str: a value JSON cannot hold (bytes in an error body) must not fail the job.
    try:
        return json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape in INPUT: keep it escaped
        return json.dumps(obj, default=str).encode("ascii")


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

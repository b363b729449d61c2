"""The output directory: checked before any work, staged beside itself, swapped in at the end.

The merge writes ``.NAME.partial-PID-XXXXXXXX`` beside ``NAME`` and renames it into place only
when it is complete (and verified); what killed runs leave behind, the next run removes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from merge.errors import MergeError


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError inside names ``path`` where it names no file: a write() on a full disk or a
    read-only target does not say which file it was writing."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def write_text(path: Path, text: str) -> None:
    with naming(path):
        path.write_text(text)


def check_output(output: Path, overwrite: bool, protected: Mapping[str, Path]) -> None:
    """A one-line refusal of the (absolute) output path: one inside an input, a parent that is not
    a directory, an output that exists without --overwrite, or one whose replacement would delete
    the inputs or the directory this runs in."""
    for what, path in protected.items():
        # Writing into an input would leave the merge's files in it (a hub cache snapshot, say), and
        # a later --overwrite of that output would delete part of the input.
        path = path.resolve()
        if path in output.parents:
            raise MergeError(f"output {output} is inside the {what} ({path}); write it elsewhere")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MergeError(f"output {output}: its parent {parent} is not a directory")
            break
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise MergeError(f"output {output} exists; pass --overwrite to replace it")
        for what, path in {**protected, "current directory": Path.cwd()}.items():
            path = path.resolve()
            if path == output or output in path.parents:
                raise MergeError(f"output {output} holds the {what} ({path}); --overwrite would delete it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _locked(path: Path) -> bool:
    """Whether a live merge holds ``path``: its staging directory, or the output that became.
    A flock outlives no process, and is seen from any PID namespace that shares the file system."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # and with it the probe's own lock
    return False


def make_staging(output: Path) -> tuple[Path, int]:
    """The staging directory ``.NAME.partial-PID-XXXXXXXX`` beside ``output``, and a descriptor
    holding its flock until the merge ends (see clean_stale)."""
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        lock = os.open(staging, os.O_RDONLY)
    except BaseException:
        staging.rmdir()
        raise
    fcntl.flock(lock, fcntl.LOCK_EX)  # cannot block: the directory is new
    return staging, lock


def clean_stale(output: Path) -> None:
    """Remove what killed runs left beside ``output``: staging directories
    (``.NAME.partial-PID-XXXXXXXX``, hex) and, from a kill in the middle of a replacement, the
    previous output (``.NAME.old-PID``), which is put back when ``output`` itself is missing.
    Only names exactly of those forms, owned by this user, whose process is gone and whose
    staging (or the output it became) no live merge holds locked; best effort, never an error."""
    if not output.parent.is_dir():
        return
    name = re.escape(output.name)
    staging = re.compile(rf"^\.{name}\.partial-(?P<pid>\d+)-[0-9a-f]{{8}}$")
    old = re.compile(rf"^\.{name}\.old-(?P<pid>\d+)$")
    for leftover in sorted(output.parent.iterdir()):
        match = staging.match(leftover.name) or old.match(leftover.name)
        try:
            if (
                match is None
                or leftover.lstat().st_uid != os.getuid()
                or _pid_alive(int(match["pid"]))
                or _locked(leftover)
            ):
                continue
            if match.re is staging:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
            elif output.exists() or output.is_symlink():
                if not _locked(output):  # else its run is live, about to remove this itself
                    _remove(leftover)
            else:
                leftover.rename(output)
        except OSError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failure can take them back."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_created(created: Sequence[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()  # only while empty: never anything another process put there
        except OSError:
            break


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside wait until it is left, then go to their handlers.
    Python runs signal handlers in the main thread only, so elsewhere there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {
        signum: signal.signal(signum, lambda received, _frame: caught.append(received))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


def replace_dir(staging: Path, output: Path) -> None:
    """Move ``staging`` to ``output``, the previous output aside first and then away. SIGINT and
    SIGTERM wait until this is done (or undone): no signal leaves the output missing or the old
    one beside it. Only SIGKILL can land in between; clean_stale puts the old output back then."""
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    with _signals_deferred():
        moved = output.exists() or output.is_symlink()
        if moved:
            output.rename(old)
        try:
            staging.rename(output)
        except BaseException:
            if moved:
                old.rename(output)
            raise
        if moved:
            with contextlib.suppress(OSError):  # the new output is in; the next run's clean_stale retries
                _remove(old)

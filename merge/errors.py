"""The one exception of a refused merge."""

from __future__ import annotations


class MergeError(Exception):
    """A merge that cannot be done faithfully. The message is one line and names the culprit."""


def first_line(exc: BaseException) -> str:
    """What a library's exception says, in one line for a MergeError (its type where it says nothing)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

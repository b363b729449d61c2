"""The one exception of a refused merge."""

from __future__ import annotations


class MergeError(Exception):
    """A merge that cannot be done faithfully. The message is one line and names the culprit."""

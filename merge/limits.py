"""How much memory the merge's streaming may hold at a time.

The modules that stream read these as ``limits.CHUNK_BYTES`` (not ``from ... import``), so that
this module is the one place to change them, and a test can shrink them for all at once."""

from __future__ import annotations

CHUNK_BYTES = 16 << 20  # copies and casts stream through this much memory at a time
CHUNK_VALUES = 1 << 22  # merges, NF4 round trips and checks work on this many values at a time

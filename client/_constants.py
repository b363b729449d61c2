"""Client defaults, in one place."""

from __future__ import annotations

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MODEL = "endpoint-extractor"
DEFAULT_MAX_TOKENS = 512
# A truncated answer is retried once with this many tokens (the server's default cap).
RETRY_MAX_TOKENS = 1024
DEFAULT_MAX_RETRIES = 4
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=120.0)
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 20.0
# Seconds a server that cannot be reached (or answers 502/503/504) sits out before it is tried
# again: short, so a restarted server rejoins soon.
SERVER_COOLDOWN = 5.0
API_KEY_ENV = "ENDPOINT_API_KEY"

# Bulk jobs (client/batch.py).
# A longer input line is failed without being read into memory (the server caps bodies at 1 MB).
BATCH_MAX_LINE_BYTES = 1_000_000
# The output is flushed after every line and fsynced at least this often (seconds) and at the end.
BATCH_FSYNC_INTERVAL = 1.0
BATCH_MAX_CONCURRENCY = 1024

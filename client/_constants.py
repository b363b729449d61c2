"""Client defaults, in one place."""

from __future__ import annotations

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_MODEL = "endpoint-extractor"
# None: send no max_tokens, so the server's cap (serve's --max-tokens-cap) is the budget: one request
# with the whole budget, an answer never generated twice. A cut answer is OutputTruncatedError.
DEFAULT_MAX_TOKENS: int | None = None
DEFAULT_MAX_RETRIES = 4
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=120.0)
# Backoff before retry n (0-based), as openai-python: min(0.5 * 2**n, 8) * uniform(0.75, 1.0).
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 8.0
# The longest wait a server may ask for (Retry-After as seconds or an HTTP date, or
# retry-after-ms) that is honoured, as openai-python's. A longer ask is not retried (openai-python
# retries it sooner, on its backoff, against the server's ask): the error comes back at once, so a
# caller is never parked for minutes inside one call. A pool of servers still fails over to a
# server this call has not tried.
RETRY_AFTER_MAX = 60.0
# Seconds a server that cannot be reached (or answers 502/503/504) sits out before it is tried
# again: short, so a restarted server rejoins soon.
SERVER_COOLDOWN = 5.0
API_KEY_ENV = "ENDPOINT_API_KEY"
BASE_URL_ENV = "ENDPOINT_BASE_URL"

# Bulk jobs (client/batch.py).
# A longer input line is failed without being read into memory (the server caps bodies at 1 MB).
BATCH_MAX_LINE_BYTES = 1_000_000
# The output is flushed after every line and fsynced at least this often (seconds) and at the end.
BATCH_FSYNC_INTERVAL = 1.0
BATCH_MAX_CONCURRENCY = 1024

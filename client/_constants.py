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
API_KEY_ENV = "ENDPOINT_API_KEY"

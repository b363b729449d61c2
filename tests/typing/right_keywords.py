"""What tests/typing/wrong_keywords.py gets wrong, done right: mypy --strict must accept it."""

import httpx

from client import AsyncEndpointClient, EndpointClient

EndpointClient("http://127.0.0.1:8000/v1", max_retries=3, timeout=10.0)
EndpointClient(timeout=httpx.Timeout(10.0, connect=2.0), http_client=httpx.Client())
AsyncEndpointClient(["http://a/v1", "http://b/v1"], timeout=10, http_client=httpx.AsyncClient())
EndpointClient().with_options(max_retries=3, timeout=5.0).close()

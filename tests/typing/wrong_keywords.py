"""mypy must reject every line marked ``# error:`` (tests/test_client_openai_parity.py runs it)."""

import httpx

from client import AsyncEndpointClient, EndpointClient

EndpointClient("http://127.0.0.1:8000/v1", max_retires=3)  # error: misspelt keyword
EndpointClient("http://127.0.0.1:8000/v1", timeout="10")  # error: seconds as a string
AsyncEndpointClient("http://127.0.0.1:8000/v1", timeout="10")  # error: seconds as a string
EndpointClient().with_options(max_retires=3)  # error: misspelt keyword
EndpointClient(http_client=httpx.AsyncClient())  # error: an async client for the sync one

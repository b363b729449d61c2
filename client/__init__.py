"""Typed client for the clinical-trial endpoint extractor served by ``python -m serve``.

from client import EndpointClient
with EndpointClient("http://127.0.0.1:8000/v1") as c:
    print(c.extract("Overall survival | [Time Frame: up to 5 years]"))
"""

from client._client import AsyncEndpointClient, EndpointClient, ExtractionResult, Usage
from client._exceptions import (
    APITimeoutError,
    AuthenticationError,
    BatchError,
    ClientClosedError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RateLimitError,
    RequestRejectedError,
    ServerUnavailableError,
)
from client.grounding import GroundingWarning, check_grounding
from client.models import Endpoint, EndpointExtraction, MeasurementType, endpoint_json_schema
from client.prompt import SYSTEM_PROMPT, USER_TEMPLATE, build_messages

__all__ = [
    "APITimeoutError",
    "AsyncEndpointClient",
    "AuthenticationError",
    "BatchError",
    "ClientClosedError",
    "Endpoint",
    "EndpointClient",
    "EndpointError",
    "EndpointExtraction",
    "GroundingWarning",
    "ExtractionResult",
    "InvalidInputError",
    "InvalidOutputError",
    "MeasurementType",
    "OutputTruncatedError",
    "RateLimitError",
    "RequestRejectedError",
    "SYSTEM_PROMPT",
    "ServerUnavailableError",
    "USER_TEMPLATE",
    "Usage",
    "build_messages",
    "check_grounding",
    "endpoint_json_schema",
]

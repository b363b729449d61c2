"""Typed client for the clinical-trial endpoint extractor served by ``python -m serve``.

from client import EndpointClient
with EndpointClient("http://127.0.0.1:8000/v1") as c:
    print(c.extract("Overall survival | [Time Frame: up to 5 years]"))
"""

from client._client import AsyncEndpointClient, EndpointClient, ExtractionResult, Usage
from client._exceptions import (
    AuthenticationError,
    BatchError,
    EndpointError,
    InvalidInputError,
    InvalidOutputError,
    OutputTruncatedError,
    RequestRejectedError,
    ServerUnavailableError,
)
from client.grounding import GroundingWarning, check_grounding
from client.models import Endpoint, EndpointExtraction, MeasurementType, endpoint_json_schema
from client.prompt import SYSTEM_PROMPT, USER_TEMPLATE, build_messages

__all__ = [
    "AsyncEndpointClient",
    "AuthenticationError",
    "BatchError",
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
    "RequestRejectedError",
    "SYSTEM_PROMPT",
    "ServerUnavailableError",
    "USER_TEMPLATE",
    "Usage",
    "build_messages",
    "check_grounding",
    "endpoint_json_schema",
]

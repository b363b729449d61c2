"""The endpoint schema. These models are the single source of truth: the server enforces
``EndpointExtraction.model_json_schema()`` and the client validates every answer against it.

Strict: the models accept exactly what that JSON schema accepts, no conversions (pydantic's lax
mode would take ``"yes"``, ``"off"`` or ``1`` for a bool, and a number for a string), from JSON text
and from the Python values JSON decodes to alike. tests/test_models.py checks it case by case
against ``jsonschema``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class MeasurementType(str, Enum):
    CONTINUOUS = "continuous"
    BINARY = "binary"
    TIME_TO_EVENT = "time-to-event"
    ORDINAL = "ordinal"


def _member(value: object) -> object:
    """A JSON string names a member; strict mode alone would want the member itself from Python
    (and lax mode takes bytes too). An unknown name fails as pydantic's own enum error would."""
    return MeasurementType(value) if isinstance(value, str) else value


_Measurement = Annotated[MeasurementType, BeforeValidator(_member)]


class Endpoint(BaseModel):
    """One endpoint. Field order is the model card's: guided decoding emits keys in this order."""

    model_config = ConfigDict(extra="forbid", strict=True, use_enum_values=False)

    endpoint_name_standardized: str | None = Field(
        description="Normalized endpoint name (e.g. ORR -> Objective Response Rate)."
    )
    measurement_of: str | None = Field(description="Underlying clinical concept being measured.")
    measurement_type: _Measurement | None = Field(
        description="One of continuous, binary, time-to-event, ordinal."
    )
    metric_type: str | None = Field(
        description="Statistical metric (mean, median, proportion, hazard ratio, ...)."
    )
    timeframe: str | None = Field(description='Assessment window (e.g. "24 weeks", "Up to 5 years").')
    measurement_method: str | None = Field(
        description="Physical tool or technique (CT scan, MRI, blood test), not a scoring system."
    )
    evaluation_criteria: str | None = Field(
        description="Scoring system or guideline (RECIST v1.1, WHO criteria), not a measurement tool."
    )
    unit: str | None = Field(description="Measurement unit (%, mL, ms, ng/mL, ...).")
    population: str | None = Field(description="Study population if specified (ITT, safety population, ...).")
    is_composite: bool = Field(description="Whether the endpoint combines multiple events.")
    components: list[str] = Field(description="Component events of a composite endpoint.")


class EndpointExtraction(BaseModel):
    """The model's whole answer: every endpoint found in one text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    endpoints: list[Endpoint] = Field(min_length=1)


def endpoint_json_schema() -> dict[str, object]:
    """The JSON schema the server enforces, generated from the models above."""
    return EndpointExtraction.model_json_schema()

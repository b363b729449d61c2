"""The schema and the prompt: exactly the model card's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from client import SYSTEM_PROMPT, EndpointExtraction, MeasurementType, build_messages, endpoint_json_schema

CARD_FIELDS = [
    "endpoint_name_standardized", "measurement_of", "measurement_type", "metric_type", "timeframe",
    "measurement_method", "evaluation_criteria", "unit", "population", "is_composite", "components",
]  # fmt: skip
GOLD = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "gold.jsonl"


def test_schema_has_the_cards_eleven_fields_in_order_all_required() -> None:
    schema = endpoint_json_schema()
    endpoint = schema["$defs"]["Endpoint"]
    assert list(endpoint["properties"]) == CARD_FIELDS
    assert endpoint["required"] == CARD_FIELDS
    assert endpoint["additionalProperties"] is False
    assert schema["required"] == ["endpoints"] and schema["properties"]["endpoints"]["minItems"] == 1


def test_nullability_and_types() -> None:
    props = endpoint_json_schema()["$defs"]["Endpoint"]["properties"]
    for name in CARD_FIELDS[:9]:
        types = {alt.get("type") or alt.get("$ref") for alt in props[name]["anyOf"]}
        assert "null" in types, name
    assert props["is_composite"]["type"] == "boolean"
    assert props["components"] == {**props["components"], "type": "array", "items": {"type": "string"}}
    assert [m.value for m in MeasurementType] == ["continuous", "binary", "time-to-event", "ordinal"]


def test_card_examples_validate() -> None:
    cards = [json.loads(line) for line in GOLD.read_text().splitlines()[:3]]
    for item in cards:
        parsed = EndpointExtraction.model_validate(item["expected"])
        assert parsed.model_dump(mode="json") == item["expected"]


@pytest.mark.parametrize(
    "bad",
    [
        {"endpoints": []},
        {"endpoints": [{"endpoint_name_standardized": "x"}]},
        {
            "endpoints": [
                {**dict.fromkeys(CARD_FIELDS[:9]), "is_composite": False, "components": [], "extra": 1}
            ]
        },
        {
            "endpoints": [
                {
                    **dict.fromkeys(CARD_FIELDS[:9]),
                    "measurement_type": "nominal",
                    "is_composite": False,
                    "components": [],
                }
            ]
        },
    ],
)
def test_invalid_answers_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        EndpointExtraction.model_validate(bad)


def test_prompt_is_the_cards() -> None:
    messages = build_messages("Body height")
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert SYSTEM_PROMPT == (
        "You are a clinical trial endpoint extraction system. Extract structured endpoint "
        "information from clinical trial text. Return ONLY valid JSON."
    )
    assert messages[1]["content"] == (
        "Extract all endpoint fields from this clinical trial text. Return ONLY a JSON.\n\n"
        "Text:\nBody height\n\nOutput (JSON only):"
    )

"""The schema and the prompt: exactly the model card's."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from client import SYSTEM_PROMPT, EndpointExtraction, MeasurementType, build_messages, endpoint_json_schema

CARD_FIELDS = [
    "endpoint_name_standardized", "measurement_of", "measurement_type", "metric_type", "timeframe",
    "measurement_method", "evaluation_criteria", "unit", "population", "is_composite", "components",
]  # fmt: skip
# sha256 of json.dumps(endpoint_json_schema()) as served before the models became strict.
SCHEMA_SHA256 = "f30c206fa89c9c199ee13f50c72ef9988d77aa1bfbdc5b12da5faa9872f3bfc2"
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


# -- strict: the models accept exactly what the JSON schema accepts (issue 12, item 8) -----------

STRING_FIELDS = [name for name in CARD_FIELDS[:9] if name != "measurement_type"]


def endpoint(**changes: object) -> dict[str, object]:
    return {**dict.fromkeys(CARD_FIELDS[:9]), "is_composite": False, "components": [], **changes}


def without(field: str) -> dict[str, object]:
    return {k: v for k, v in endpoint().items() if k != field}


def _schema_cases() -> list[tuple[str, object, bool]]:
    """(id, decoded JSON answer, accepted by the schema); more of each class than issue 12 lists."""
    ok = [
        ("minimal", {"endpoints": [endpoint()]}),
        ("composite", {"endpoints": [endpoint(is_composite=True, components=["death", "MI", ""])]}),
        ("two endpoints", {"endpoints": [endpoint(), endpoint(unit="cm")]}),
        (
            "unicode and NUL",
            {"endpoints": [endpoint(endpoint_name_standardized="Δ HbA1c ≥ 7 %\u0000", unit="")]},
        ),
        *((f"type {m.value}", {"endpoints": [endpoint(measurement_type=m.value)]}) for m in MeasurementType),
        *((f"{name} a string", {"endpoints": [endpoint(**{name: "x"})]}) for name in STRING_FIELDS),
    ]
    wrong_bool: list[object] = ["off", "yes", "true", "false", "0", "", 1, 0, 1.0, 0.0, None, [], {}, [True]]
    wrong_string: list[object] = [1, 0, 1.5, -2, True, False, [], ["x"], {}, {"x": "y"}]
    wrong_type: list[object] = [
        "Continuous",
        "CONTINUOUS",
        "nominal",
        " binary",
        "",
        0,
        1,
        True,
        ["binary"],
        {},
    ]
    wrong_components: list[object] = [None, "a", "", [1], [None], [True], [["a"]], [{}], {"a": 1}, 0, True]
    wrong_endpoints: list[object] = [[], None, {}, "x", 1, True, [None], [1], ["x"], [[]], [endpoint(), None]]
    bad = [
        *((f"is_composite {v!r}", {"endpoints": [endpoint(is_composite=v)]}) for v in wrong_bool),
        *(
            (f"{name} {v!r}", {"endpoints": [endpoint(**{name: v})]})
            for name in STRING_FIELDS
            for v in wrong_string
        ),
        *((f"measurement_type {v!r}", {"endpoints": [endpoint(measurement_type=v)]}) for v in wrong_type),
        *((f"components {v!r}", {"endpoints": [endpoint(components=v)]}) for v in wrong_components),
        *((f"endpoints {v!r:.30}", {"endpoints": v}) for v in wrong_endpoints),
        *((f"missing {name}", {"endpoints": [without(name)]}) for name in CARD_FIELDS),
        ("extra field", {"endpoints": [endpoint(extra=None)]}),
        ("extra top-level key", {"endpoints": [endpoint()], "notes": None}),
        ("no endpoints key", {}),
        ("top-level list", [endpoint()]),
        ("top-level null", None),
        ("top-level string", "endpoints"),
        ("endpoint a list", {"endpoints": [list(endpoint().values())]}),
    ]
    return [(name, value, True) for name, value in ok] + [(name, value, False) for name, value in bad]


SCHEMA_CASES = _schema_cases()


@pytest.mark.parametrize(
    ("answer", "accepted"), [(v, a) for _, v, a in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_models_accept_exactly_what_the_json_schema_accepts(answer: object, accepted: bool) -> None:
    import jsonschema

    schema_says = jsonschema.Draft202012Validator(endpoint_json_schema()).is_valid(answer)
    assert schema_says is accepted  # the case table itself is right

    def verdict(validate: Callable[[], object]) -> bool:
        try:
            validate()
        except ValidationError:
            return False
        return True

    text = json.dumps(answer)
    assert verdict(lambda: EndpointExtraction.model_validate(answer)) is schema_says, "from Python values"
    assert verdict(lambda: EndpointExtraction.model_validate_json(text)) is schema_says, "from JSON text"


def test_accepted_answers_keep_their_values() -> None:
    answer = {
        "endpoints": [endpoint(measurement_type="time-to-event", is_composite=True, components=["death"])]
    }
    for parsed in (
        EndpointExtraction.model_validate(answer),
        EndpointExtraction.model_validate_json(json.dumps(answer)),
    ):
        assert parsed.endpoints[0].measurement_type is MeasurementType.TIME_TO_EVENT
        assert parsed.model_dump(mode="json") == answer


def test_the_schema_the_server_enforces_is_unchanged() -> None:
    """Strictness is validation only: the schema served for guided decoding is byte for byte the
    one it was before (fields, order, descriptions)."""
    digest = hashlib.sha256(json.dumps(endpoint_json_schema()).encode()).hexdigest()
    assert digest == SCHEMA_SHA256

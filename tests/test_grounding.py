"""Grounding rules: each one firing and not firing, on hand-made extractions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from client import EndpointClient, EndpointExtraction, check_grounding
from client.grounding import GroundingWarning, tokens

PFS = "Progression-Free Survival (PFS) assessed by RECIST v1.1 using CT scan at 24 weeks"
GOLD = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "gold.jsonl"


def endpoint(name: str | None = "Progression-Free Survival", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "endpoint_name_standardized": name, "measurement_of": None, "measurement_type": None,
        "metric_type": None, "timeframe": None, "measurement_method": None, "evaluation_criteria": None,
        "unit": None, "population": None, "is_composite": False, "components": [],
    }  # fmt: skip
    return base | fields


def extraction(*endpoints: dict[str, Any]) -> EndpointExtraction:
    return EndpointExtraction.model_validate({"endpoints": list(endpoints)})


def rules(text: str, *endpoints: dict[str, Any]) -> list[tuple[str, int]]:
    return [(w.rule, w.endpoint) for w in check_grounding(text, extraction(*endpoints))]


def test_tokens_fold_case_width_punctuation_plurals_and_units() -> None:
    assert tokens("TNF-α, ＣＴ Scans (24 wk)") == ["tnf", "α", "ct", "scan", "24", "week"]
    assert tokens("术后3个月") == ["术", "后", "3", "个", "月"]


def test_measurement_method_named_in_the_text_passes() -> None:
    assert rules(PFS, endpoint(measurement_method="CT scan")) == []
    assert rules(PFS, endpoint(measurement_method="ct-scan")) == []
    assert rules(PFS, endpoint(measurement_method=None)) == []


def test_measurement_method_the_text_never_names_fires() -> None:
    assert rules(PFS, endpoint(measurement_method="MRI")) == [("measurement_method", 0)]
    assert rules("Body height", endpoint("Body height", measurement_method="Stadiometer")) == [
        ("measurement_method", 0)
    ]


def test_measurement_method_abbreviation_and_word_stems() -> None:
    text = "Lumbar spine bone mineral density assessed by DXA, lung volumes by spirometry"
    assert rules(text, endpoint(measurement_method="Dual-energy X-ray absorptiometry (DXA)")) == []
    assert rules(text, endpoint(measurement_method="Spirometric assessment")) == []
    # an abbreviation the text does not use does not rescue an unnamed long form
    assert rules(text, endpoint(measurement_method="Quantitative computed tomography (QCT)")) == [
        ("measurement_method", 0)
    ]


def test_timeframe_rules() -> None:
    assert rules(PFS, endpoint(timeframe="24 weeks")) == []
    assert rules(PFS, endpoint(timeframe="Week 24")) == []
    assert rules(PFS, endpoint(timeframe="24 wk")) == []
    assert rules(PFS, endpoint(timeframe="12 weeks")) == [("timeframe", 0)]  # number missing
    assert rules(PFS, endpoint(timeframe="Up to 24 months")) == [("timeframe", 0)]  # unit missing
    assert rules("Body height", endpoint(timeframe="Baseline")) == [("timeframe", 0)]


def test_extra_endpoint_repeating_the_first_fires() -> None:
    first = endpoint(measurement_of="progression or death")
    assert rules(PFS, first, dict(first)) == [("extra_endpoint", 1)]


def test_extra_endpoint_without_textual_basis_fires_and_the_first_never_does() -> None:
    invented = endpoint("Overall Survival", measurement_of="death from any cause")
    assert rules(PFS, endpoint(), invented) == [("extra_endpoint", 1)]
    # the rule judges endpoints after the first: an ungrounded first one is not its business
    assert rules("Body height", invented, endpoint("Body height")) == []


def test_extra_endpoint_named_in_the_text_passes() -> None:
    text = "Number of Participants With Adverse Events (AEs) and Serious Adverse Events (SAEs) | [Time Frame: Up to 52 weeks]"  # fmt: skip
    aes = endpoint("Number of Participants With Adverse Events", measurement_of="adverse events")
    saes = endpoint(
        "Number of Participants With Serious Adverse Events", measurement_of="serious adverse events"
    )
    assert rules(text, aes, saes) == []
    scores = "Change From Baseline in PHQ-9 and GAD-7 Total Scores | [Time Frame: Baseline, Week 12]"
    phq = endpoint("Change From Baseline in Patient Health Questionnaire-9 (PHQ-9) Total Score")
    gad = endpoint("Change From Baseline in Generalized Anxiety Disorder-7 (GAD-7) Total Score")
    assert rules(scores, phq, gad) == []


def test_registry_field_labels_are_not_evidence() -> None:
    text = (
        "Outcome: HbA1c; Type: Primary indicator; Measure time point of outcome: Week 12; "
        "Measure method of outcome: HPLC"
    )
    # "time" and "method" occur only in the registry's labels
    assert rules(text, endpoint("HbA1c"), endpoint("Operative Time")) == [("extra_endpoint", 1)]
    assert rules(text, endpoint("HbA1c", measurement_method="Gravimetric method")) == [
        ("measurement_method", 0)
    ]
    assert rules(text, endpoint("HbA1c", measurement_method="HPLC", timeframe="Week 12")) == []


def test_cjk_text_judges_cjk_values_and_skips_translations() -> None:
    text = (
        "次要结局指标：左心室舒张末期内径（LVEDD，mm）；测量时间点：术前、术后3个月；测量方法：经胸超声心动图"
    )
    assert rules(text, endpoint("LVEDD", measurement_method="经胸超声心动图", timeframe="术后3个月")) == []
    assert rules(text, endpoint("LVEDD", measurement_method="磁共振成像")) == [("measurement_method", 0)]
    assert rules(text, endpoint("LVEDD", timeframe="术后6个月")) == [("timeframe", 0)]
    # an English label for a Chinese text cannot be judged lexically: no warning either way
    assert rules(text, endpoint("LVEDD", measurement_method="Transthoracic echocardiography")) == []
    assert rules(text, endpoint("LVEDD", measurement_method="Cardiac MRI")) == []


def test_warning_carries_where_and_what_and_never_alters_the_extraction() -> None:
    value = extraction(endpoint(measurement_method="MRI", timeframe="12 weeks"))
    before = value.model_dump()
    found = check_grounding(PFS, value)
    assert value.model_dump() == before
    assert found == [
        GroundingWarning("measurement_method", 0, "measurement_method", "MRI", "method 'MRI' is not named in the text"),
        GroundingWarning("timeframe", 0, "timeframe", "12 weeks", "timeframe '12 weeks' is not named in the text"),
    ]  # fmt: skip
    assert str(found[0]) == "endpoints[0].measurement_method: method 'MRI' is not named in the text"


def test_gold_labels_are_grounded_except_the_cards_inferred_stadiometer() -> None:
    """The gold set's labels follow the texts; the one inferred method is the model card's own
    "Body height" example, the failure the card names."""
    found = []
    for line in GOLD.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for w in check_grounding(row["text"], EndpointExtraction.model_validate(row["expected"])):
            found.append((row["id"], w.rule, w.value))
    assert found == [("g003", "measurement_method", "Stadiometer")]


def _answer(content: str) -> httpx.Response:
    return httpx.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 0, "model": "endpoint-extractor",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })  # fmt: skip


def _client(grounding: bool) -> EndpointClient:
    body = extraction(endpoint("Body height", measurement_method="Stadiometer")).model_dump_json()
    transport = httpx.MockTransport(lambda request: _answer(body))
    return EndpointClient("http://test/v1", grounding=grounding, transport=transport)


def test_client_grounding_option_attaches_warnings_and_keeps_the_answer() -> None:
    with _client(grounding=True) as client:
        (result,) = client.extract_many(["Body height"], concurrency=1)
    assert result.ok and result.value is not None
    assert result.value.endpoints[0].measurement_method == "Stadiometer"
    assert [(w.rule, w.value) for w in result.warnings] == [("measurement_method", "Stadiometer")]
    with _client(grounding=True).with_options(max_retries=0) as copy:
        assert copy._options.grounding  # with_options keeps the option


def test_client_grounding_is_off_by_default() -> None:
    with _client(grounding=False) as client:
        (result,) = client.extract_many(["Body height"], concurrency=1)
    assert result.ok and result.warnings == ()

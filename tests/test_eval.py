"""benchmarks/eval.py: scoring and comparison of hand-made predictions with known answers, the
command line and its bad-input errors, and one run of ``predict`` against the real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.eval import (
    GoldItem,
    align,
    compare,
    load_gold,
    load_predictions,
    main,
    normalise,
    score,
    similarity,
)
from client import Endpoint, EndpointExtraction, check_grounding

GOLD = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "gold.jsonl"


def ep(name: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "endpoint_name_standardized": name, "measurement_of": None, "measurement_type": None,
        "metric_type": None, "timeframe": None, "measurement_method": None, "evaluation_criteria": None,
        "unit": None, "population": None, "is_composite": False, "components": [],
    }  # fmt: skip
    return base | fields


SBP = ep("Systolic Blood Pressure", measurement_type="continuous", timeframe="Week 8", unit="mmHg")
DBP = ep("Diastolic Blood Pressure", measurement_type="continuous", timeframe="Week 8", unit="mmHg")
OS = ep("Overall Survival", measurement_type="time-to-event", timeframe="Up to 5 years")
MACE = ep(
    "Major Adverse Cardiovascular Events", measurement_type="time-to-event", timeframe="Up to 3 years",
    is_composite=True, components=["cardiovascular death", "myocardial infarction"],
)  # fmt: skip
CR = ep("Complete Remission Rate", measurement_type="binary", timeframe="Day 28", is_composite=True, components=["CR", "CRi"])  # fmt: skip

GOLD_ROWS = [
    {"id": "s1", "kind": "single", "text": "Overall survival | [Time Frame: Up to 5 years]", "expected": [OS]},
    {"id": "s2", "kind": "single", "text": "Body height", "expected": [ep("Body height", measurement_type="continuous")]},
    {"id": "m1", "kind": "multiple", "text": "Systolic and diastolic blood pressure (mmHg) at Week 8", "expected": [SBP, DBP]},
    {"id": "c1", "kind": "composite", "text": "MACE: cardiovascular death or myocardial infarction, up to 3 years", "expected": [MACE]},
    {"id": "c2", "kind": "composite", "text": "Complete remission (CR + CRi) at Day 28", "expected": [CR]},
]  # fmt: skip

# Known answers, field by field (6 gold endpoints):
#  s1: timeframe differs only in case/punctuation; a hallucinated second endpoint.
#  s2: error, no answer.
#  m1: endpoints in swapped order; diastolic measurement_type wrong and is_composite wrongly true.
#  c1: composite missed (is_composite false), components reordered and re-cased.
#  c2: right.
PRED_ROWS = [
    {"id": "s1", "output": {"endpoints": [OS | {"timeframe": "up to 5 years."}, ep("Progression-Free Survival")]}},
    {"id": "s2", "error": "ServerUnavailableError: down"},
    {"id": "m1", "output": {"endpoints": [DBP | {"measurement_type": "ordinal", "is_composite": True}, SBP]}},
    {"id": "c1", "output": {"endpoints": [MACE | {"is_composite": False, "components": ["Myocardial infarction", "cardiovascular death"]}]}},
    {"id": "c2", "output": {"endpoints": [CR]}},
]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    gold = [r | {"registry": "ctgov", "expected": {"endpoints": r["expected"]}} for r in GOLD_ROWS]
    perfect = [{"id": r["id"], "output": {"endpoints": r["expected"]}} for r in GOLD_ROWS]
    return {
        "gold": write_jsonl(tmp_path / "gold.jsonl", gold),
        "pred": write_jsonl(tmp_path / "pred.jsonl", PRED_ROWS),
        "perfect": write_jsonl(tmp_path / "perfect.jsonl", perfect),
    }


def ratio(count: int, total: int) -> dict[str, Any]:
    return {"count": count, "total": total, "rate": round(count / total, 4)}


def test_normalise() -> None:
    assert normalise("  Up to 5 Years. ") == "up to 5 years"
    assert normalise("TNF-α") == "tnf α"
    assert normalise("ＣＴ scan") == "ct scan"  # full-width folded by NFKC
    assert normalise("%") == "%"  # only punctuation: kept, so "%" is not null
    assert normalise(None) == normalise("") == normalise("  ") == ""


def test_alignment_pairs_by_name_not_position() -> None:
    sbp, dbp = Endpoint.model_validate(SBP), Endpoint.model_validate(DBP)
    assert similarity(sbp, sbp) == 1.0
    assert similarity(sbp, dbp) == pytest.approx(2 * 2 / 6)
    assert align([sbp, dbp], [dbp, sbp]) == [(0, 1), (1, 0)]
    assert align([sbp], [dbp, sbp, dbp]) == [(0, 1)]
    assert align([sbp, dbp], []) == []


def test_score_hand_made_predictions(files: dict[str, Path]) -> None:
    gold = load_gold(files["gold"])
    report = score(gold, load_predictions(files["pred"], gold))
    assert report["items"] == 5 and report["gold_endpoints"] == 6
    assert report["status"] == {"valid": 4, "invalid": 0, "error": 1, "missing": 0}
    assert report["schema_valid"] == ratio(4, 5)
    assert report["endpoint_count"] == {"exact": ratio(3, 5), "over": ratio(1, 5), "under": ratio(0, 5)}
    # single-endpoint items with an answer: s1, c1, c2; s1 grew a second endpoint
    assert report["second_endpoint_on_single"] == ratio(1, 3)
    fields = report["fields"]
    assert fields["timeframe"] == {"exact": ratio(4, 6), "normalised": ratio(5, 6)}
    assert fields["components"] == {"exact": ratio(4, 6), "normalised": ratio(5, 6)}
    assert fields["is_composite"]["exact"] == ratio(3, 6)
    assert fields["endpoint_name_standardized"]["exact"] == ratio(5, 6)  # s2 unanswered
    assert report["composite"] == {"tp": 1, "fp": 1, "fn": 1, "precision": 0.5, "recall": 0.5}
    assert report["measurement_type"]["accuracy"] == ratio(4, 6)
    assert report["measurement_type"]["confusion"] == {
        "binary": {"binary": 1},
        "continuous": {"continuous": 1, "ordinal": 1, "unmatched": 1},
        "time-to-event": {"time-to-event": 2},
    }
    assert report["grounding"]["warnings"] == {"measurement_method": 0, "timeframe": 0, "extra_endpoint": 1}
    assert report["grounding"]["items_with_warnings"] == ratio(1, 4)
    assert report["by_kind"]["single"]["schema_valid"] == ratio(1, 2)
    assert report["by_kind"]["multiple"]["endpoint_count"]["exact"] == ratio(1, 1)
    detail = {d["id"]: d for d in report["items_detail"]}
    assert detail["s2"]["reason"] == "ServerUnavailableError: down"
    assert detail["s1"]["predicted_endpoints"] == 2 and detail["s1"]["warnings"] == {"extra_endpoint": 1}


def test_invalid_and_missing_predictions(files: dict[str, Path], tmp_path: Path) -> None:
    rows = [
        {"id": "s1", "output": {"endpoints": []}},  # min_length 1
        {"id": "m1", "output": '{"endpoints": [' + json.dumps(SBP) + "," + json.dumps(DBP) + "]}"},
        {"id": "c1", "output": {"endpoints": [MACE | {"measurement_type": "sometimes"}]}},
    ]
    gold = load_gold(files["gold"])
    predictions = load_predictions(write_jsonl(tmp_path / "p.jsonl", rows), gold)
    report = score(gold, predictions)
    assert report["status"] == {"valid": 1, "invalid": 2, "error": 0, "missing": 2}
    assert report["fields"]["unit"]["exact"] == ratio(2, 6)  # only m1 (raw JSON text) answered
    assert predictions["s1"].reason is not None and predictions["s1"].reason.startswith("endpoints:")


def test_perfect_predictions_score_one_everywhere(files: dict[str, Path]) -> None:
    gold = load_gold(files["gold"])
    report = score(gold, load_predictions(files["perfect"], gold))
    assert report["field_mean_normalised"] == 1.0
    assert all(f["exact"]["rate"] == 1.0 for f in report["fields"].values())
    assert report["composite"]["precision"] == report["composite"]["recall"] == 1.0
    assert report["second_endpoint_on_single"]["count"] == 0


def test_the_shipped_gold_set_scores_itself_perfectly() -> None:
    gold = load_gold(GOLD)
    assert len(gold) >= 60 and {"ctgov", "euctr", "chictr"} <= {g.registry for g in gold}
    perfect = {g.id: _valid(g) for g in gold}
    report = score(gold, perfect)
    assert report["schema_valid"]["rate"] == report["field_mean_normalised"] == 1.0
    assert report["endpoint_count"]["exact"]["rate"] == 1.0


def _valid(item: GoldItem) -> Any:
    from benchmarks.eval import Prediction

    return Prediction(item.id, "valid", output=item.expected)


def test_compare_two_systems(files: dict[str, Path]) -> None:
    gold = load_gold(files["gold"])
    a, b = load_predictions(files["perfect"], gold), load_predictions(files["pred"], gold)
    result = compare(gold, a, b)
    assert result["schema_valid_agreement"] == ratio(4, 5)
    assert result["both_valid"] == 4
    assert result["endpoint_count_agreement"] == ratio(3, 4)
    assert (result["endpoint_pairs"], result["endpoint_slots"]) == (5, 6)
    assert result["fields"]["timeframe"] == {"exact": ratio(4, 6), "normalised": ratio(5, 6)}
    assert result["fields"]["is_composite"]["normalised"] == ratio(3, 6)
    assert result["fields"]["unit"]["normalised"] == ratio(5, 6)  # the unmatched extra endpoint
    found = [(d["id"], d["field"]) for d in result["disagreements"]]
    assert found == [
        ("s1", "endpoint_count"),
        ("s1", "endpoint"),
        ("s2", "schema_valid"),
        ("m1", "measurement_type"),
        ("m1", "is_composite"),
        ("c1", "is_composite"),
    ]
    m1 = next(d for d in result["disagreements"] if d["field"] == "measurement_type")
    assert m1 == {"id": "m1", "field": "measurement_type", "a_endpoint": 1, "b_endpoint": 0, "a": "continuous", "b": "ordinal"}  # fmt: skip
    extra = result["disagreements"][1]
    assert extra["only_in"] == "b" and extra["b"] == "Progression-Free Survival"


def test_compare_a_system_with_itself_agrees_everywhere(files: dict[str, Path]) -> None:
    gold = load_gold(files["gold"])
    b = load_predictions(files["pred"], gold)
    result = compare(gold, b, b)
    assert result["disagreements"] == []
    assert all(f["exact"]["rate"] == 1.0 for f in result["fields"].values())


def test_cli_score_and_compare_print_tables_and_write_json(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    assert (
        main(["score", "--gold", str(files["gold"]), "--pred", str(files["pred"]), "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert (
        "schema-valid" in printed and "4/5" in printed and "2nd endpoint on single-endpoint items" in printed
    )
    report = json.loads(out.read_text())
    assert report["pred"] == str(files["pred"]) and report["schema_valid"] == ratio(4, 5)

    cmp = tmp_path / "cmp.json"
    args = ["compare", "--gold", str(files["gold"]), "--a", str(files["perfect"]), "--b", str(files["pred"])]
    assert main([*args, "--json", str(cmp)]) == 0
    printed = capsys.readouterr().out
    assert (
        "6 disagreements" in printed and "m1  [1|0] measurement_type: A 'continuous'  B 'ordinal'" in printed
    )
    report = json.loads(cmp.read_text())
    assert report["a"]["score"]["schema_valid"]["rate"] == 1.0
    assert len(report["agreement"]["disagreements"]) == 6


def test_cli_subset_scores_only_predicted_items(files: dict[str, Path], tmp_path: Path) -> None:
    pred = write_jsonl(tmp_path / "few.jsonl", PRED_ROWS[2:4])
    out = tmp_path / "r.json"
    assert (
        main(["score", "--gold", str(files["gold"]), "--pred", str(pred), "--subset", "--json", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["items"] == 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "zz", "error": "x"}], "(zz): id is not in the gold set"),
        ([{"id": "s1", "error": "x"}, {"id": "s1", "error": "y"}], "(s1): duplicate id"),
        ([{"id": "s1", "error": "x", "output": {}}], "exactly one of 'output' and 'error'"),
        ([{"id": "s1"}], "exactly one of 'output' and 'error'"),
        ([{"output": {}}], ":1: missing string 'id'"),
        (["not an object"], ":1: a row must be a JSON object"),
    ],
)
def test_cli_rejects_bad_prediction_files(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[Any], message: str
) -> None:
    pred = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "r.json"
    assert main(["score", "--gold", str(files["gold"]), "--pred", str(pred), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_rejects_unreadable_inputs(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "s1", "error": "x"}\n{"id": \n', encoding="utf-8")
    assert main(["score", "--gold", str(files["gold"]), "--pred", str(broken)]) == 2
    assert f"{broken}:2: not JSON" in capsys.readouterr().err
    assert main(["score", "--gold", str(tmp_path / "nope.jsonl"), "--pred", str(broken)]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad_gold = write_jsonl(tmp_path / "g.jsonl", [{"id": "x", "text": "t", "expected": {"endpoints": []}}])
    assert main(["score", "--gold", str(bad_gold), "--pred", str(broken)]) == 2
    assert "'expected' is not a valid extraction" in capsys.readouterr().err
    out = tmp_path / "no" / "such" / "dir.json"
    assert (
        main(["score", "--gold", str(files["gold"]), "--pred", str(files["pred"]), "--json", str(out)]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.e2e
def test_predict_against_the_real_server_then_score(server: Any, tmp_path: Path) -> None:
    """The tiny random model's values mean nothing; what is checked is the mechanics: every row is
    written, in gold order, each a schema-valid answer (the server enforces the schema), warnings
    are the client's grounding check, and the file scores."""
    pred, out = tmp_path / "pred.jsonl", tmp_path / "report.json"
    args = ["predict", "--gold", str(GOLD), "--out", str(pred), "--base-url", server.base_url]
    assert main([*args, "--limit", "4", "--concurrency", "2", "--grounding"]) == 0
    rows = [json.loads(line) for line in pred.read_text(encoding="utf-8").splitlines()]
    gold = load_gold(GOLD)[:4]
    assert [r["id"] for r in rows] == [g.id for g in gold]
    for row, item in zip(rows, gold, strict=True):
        assert "error" not in row, row
        value = EndpointExtraction.model_validate(row["output"])
        expected = [{"rule": w.rule, "endpoint": w.endpoint} for w in check_grounding(item.text, value)]
        assert [{"rule": w["rule"], "endpoint": w["endpoint"]} for w in row.get("warnings", [])] == expected
    assert main(["score", "--gold", str(GOLD), "--pred", str(pred), "--subset", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["items"] == 4 and report["schema_valid"] == ratio(4, 4)

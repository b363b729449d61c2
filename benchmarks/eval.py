"""Extraction quality: run a server over the gold set, score predictions, compare two systems.

    python -m benchmarks.eval predict --gold benchmarks/data/gold.jsonl --out pred.jsonl [--base-url URL]
    python -m benchmarks.eval score   --gold benchmarks/data/gold.jsonl --pred pred.jsonl [--json report.json]
    python -m benchmarks.eval compare --gold benchmarks/data/gold.jsonl --a a.jsonl --b b.jsonl [--json cmp.json]

Files. Gold: JSONL rows {id, registry, kind, text, expected}, ``expected`` an EndpointExtraction.
Predictions: JSONL rows {id, output} (the extraction as a JSON object, or its raw text) or
{id, error} (why there is none); ``predict`` writes them, any other system can too.

Definitions (all of them in the JSON report, the headline ones in the terminal table):
  - status of an item: ``valid`` (output validates against client.models.EndpointExtraction),
    ``invalid`` (output present, not schema-valid), ``error`` or ``missing`` (no row). The
    schema-valid rate is valid items over gold items; only valid items count as answers below.
  - normalised text: Unicode NFKC, case-folded, punctuation (Unicode category P*) replaced by a
    space, whitespace collapsed; a value made only of punctuation ("%") keeps its characters.
    Null and "" are the same normalised value. ``components`` compare as multisets of normalised
    strings (order-free); booleans and measurement_type compare as they are.
  - alignment: within an item, gold and predicted endpoints are paired greedily by similarity,
    the Dice coefficient of the normalised word sets of endpoint_name_standardized +
    measurement_of; highest first, ties to the lower gold then the lower predicted index. Pairs
    are formed until one side runs out, so min(#gold, #predicted) pairs; the rest are unmatched.
  - per-field match rates: over all gold endpoints; an unmatched gold endpoint (or one of an
    item without a valid answer) matches nothing. Extra predicted endpoints do not enter field
    rates; they show in the endpoint-count metrics.
  - endpoint count: exact / over / under, over gold items (no valid answer counts as wrong).
    ``second_endpoint_on_single``: the model card's known failure, the share of single-endpoint
    gold items whose valid answer has two or more endpoints.
  - composite detection: precision and recall of is_composite over gold endpoints (unmatched
    gold endpoints count as predicted false).
  - measurement_type: accuracy (= its exact field rate) and a confusion table gold -> predicted
    ("null" for None, "unmatched" for no aligned prediction).
  - grounding: client.grounding warnings on every valid answer, checked against the gold text.
  - compare: the same alignment between system A and B on the items both answer validly; a field
    agrees on a pair when the values are equal (exact) or normalise equal (normalised); an
    endpoint one system has and the other lacks disagrees on every field. Every normalised
    disagreement, validity and endpoint-count difference is listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from client import Endpoint, EndpointClient, EndpointExtraction, check_grounding
from client._constants import DEFAULT_CONCURRENCY, DEFAULT_MODEL

FIELDS: tuple[str, ...] = tuple(Endpoint.model_fields)
GROUNDING_RULES = ("measurement_method", "timeframe", "extra_endpoint")
Status = Literal["valid", "invalid", "error", "missing"]
SHOWN_DISAGREEMENTS = 25


class EvalInputError(Exception):
    """A gold or prediction file that cannot be read as specified; the message says where."""


@dataclass(frozen=True)
class GoldItem:
    id: str
    registry: str
    kind: str
    text: str
    expected: EndpointExtraction


@dataclass(frozen=True)
class Prediction:
    id: str
    status: Status
    output: EndpointExtraction | None = None
    reason: str | None = None


# --- reading ------------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise EvalInputError(f"{path}: not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise EvalInputError(f"{path}:{number}: a row must be a JSON object")
        if not isinstance(row.get("id"), str) or not row["id"]:
            raise EvalInputError(f"{path}:{number}: missing string 'id'")
        yield number, row


def load_gold(path: Path) -> list[GoldItem]:
    items: list[GoldItem] = []
    seen: set[str] = set()
    for number, row in _jsonl(path):
        where = f"{path}:{number} ({row['id']})"
        if row["id"] in seen:
            raise EvalInputError(f"{where}: duplicate id")
        seen.add(row["id"])
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise EvalInputError(f"{where}: missing non-empty 'text'")
        try:
            expected = EndpointExtraction.model_validate(row.get("expected"))
        except ValidationError as exc:
            raise EvalInputError(f"{where}: 'expected' is not a valid extraction: {_first(exc)}") from None
        items.append(
            GoldItem(row["id"], str(row.get("registry", "")), str(row.get("kind", "")), row["text"], expected)
        )
    if not items:
        raise EvalInputError(f"{path}: no gold items")
    return items


def load_predictions(path: Path, gold: Sequence[GoldItem]) -> dict[str, Prediction]:
    known = {item.id for item in gold}
    found: dict[str, Prediction] = {}
    for number, row in _jsonl(path):
        pid = row["id"]
        where = f"{path}:{number} ({pid})"
        if pid not in known:
            raise EvalInputError(f"{where}: id is not in the gold set")
        if pid in found:
            raise EvalInputError(f"{where}: duplicate id")
        if ("output" in row) == ("error" in row):
            raise EvalInputError(f"{where}: a row needs exactly one of 'output' and 'error'")
        found[pid] = (
            Prediction(pid, "error", reason=str(row["error"]))
            if "error" in row
            else _parse(pid, row["output"])
        )
    return found


def _parse(pid: str, output: object) -> Prediction:
    try:
        if isinstance(output, str):
            value = EndpointExtraction.model_validate_json(output)
        else:
            value = EndpointExtraction.model_validate(output)
    except ValidationError as exc:
        return Prediction(pid, "invalid", reason=_first(exc))
    return Prediction(pid, "valid", output=value)


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "value"
    return f"{where}: {error['msg']}"


# --- matching -----------------------------------------------------------------------------


def normalise(value: str | None) -> str:
    """Case, width, punctuation and whitespace folded away; see the module docstring."""
    if value is None:
        return ""
    folded = unicodedata.normalize("NFKC", value).casefold()
    spaced = "".join(" " if unicodedata.category(c).startswith("P") else c for c in folded)
    return " ".join(spaced.split()) or " ".join(folded.split())


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def values_equal(a: Endpoint, b: Endpoint, name: str, *, normalised: bool) -> bool:
    x, y = _plain(getattr(a, name)), _plain(getattr(b, name))
    if not normalised:
        return x == y
    if isinstance(x, list) and isinstance(y, list):
        return sorted(map(normalise, x)) == sorted(map(normalise, y))
    if (x is None or isinstance(x, str)) and (y is None or isinstance(y, str)):
        return normalise(x) == normalise(y)
    return x == y


def _words(endpoint: Endpoint) -> set[str]:
    return set(normalise(endpoint.endpoint_name_standardized).split()) | set(
        normalise(endpoint.measurement_of).split()
    )


def similarity(a: Endpoint, b: Endpoint) -> float:
    """Dice coefficient of the name + measurement_of word sets (0 when both are empty)."""
    x, y = _words(a), _words(b)
    return 2 * len(x & y) / (len(x) + len(y)) if x or y else 0.0


def align(left: Sequence[Endpoint], right: Sequence[Endpoint]) -> list[tuple[int, int]]:
    """Greedy one-to-one pairing by similarity, as the module docstring defines; sorted by left."""
    scored = sorted(
        ((similarity(a, b), i, j) for i, a in enumerate(left) for j, b in enumerate(right)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_left: set[int] = set()
    used_right: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for _, i, j in scored:
        if i not in used_left and j not in used_right:
            used_left.add(i)
            used_right.add(j)
            pairs.append((i, j))
    return sorted(pairs)


# --- scoring ------------------------------------------------------------------------------


@dataclass
class ItemScore:
    id: str
    kind: str
    registry: str
    status: Status
    gold_endpoints: int
    predicted_endpoints: int | None
    exact: Counter[str] = field(default_factory=Counter)
    normalised: Counter[str] = field(default_factory=Counter)
    composite: Counter[str] = field(default_factory=Counter)
    measurement_types: list[tuple[str, str]] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)


def _type_label(endpoint: Endpoint | None) -> str:
    if endpoint is None:
        return "unmatched"
    return "null" if endpoint.measurement_type is None else endpoint.measurement_type.value


def score_item(item: GoldItem, prediction: Prediction | None) -> ItemScore:
    gold = item.expected.endpoints
    status: Status = prediction.status if prediction else "missing"
    output = prediction.output if prediction else None
    score = ItemScore(item.id, item.kind, item.registry, status, len(gold), None)
    matched: dict[int, Endpoint] = {}
    if output is not None:
        score.predicted_endpoints = len(output.endpoints)
        matched = {i: output.endpoints[j] for i, j in align(gold, output.endpoints)}
        score.warnings.update(w.rule for w in check_grounding(item.text, output))
    for i, expected in enumerate(gold):
        got = matched.get(i)
        if got is not None:
            for name in FIELDS:
                score.exact[name] += values_equal(expected, got, name, normalised=False)
                score.normalised[name] += values_equal(expected, got, name, normalised=True)
        said = got is not None and got.is_composite
        outcome = {(True, True): "tp", (True, False): "fn", (False, True): "fp", (False, False): "tn"}
        score.composite[outcome[expected.is_composite, said]] += 1
        score.measurement_types.append((_type_label(expected), _type_label(got)))
    return score


def _ratio(count: int, total: int) -> dict[str, Any]:
    return {"count": count, "total": total, "rate": round(count / total, 4) if total else None}


def summarise(scores: Sequence[ItemScore]) -> dict[str, Any]:
    """The aggregate report over some item scores (all of them, or one kind's)."""
    items = len(scores)
    endpoints = sum(s.gold_endpoints for s in scores)
    statuses = Counter(s.status for s in scores)
    answered = [s for s in scores if s.predicted_endpoints is not None]
    exact = sum(s.predicted_endpoints == s.gold_endpoints for s in answered)
    over = sum((s.predicted_endpoints or 0) > s.gold_endpoints for s in answered)
    singles = [s for s in answered if s.gold_endpoints == 1]
    fields: dict[str, Any] = {}
    for name in FIELDS:
        fields[name] = {
            "exact": _ratio(sum(s.exact[name] for s in scores), endpoints),
            "normalised": _ratio(sum(s.normalised[name] for s in scores), endpoints),
        }
    composite = Counter[str]()
    warnings = Counter[str]()
    confusion: dict[str, Counter[str]] = {}
    for s in scores:
        composite.update(s.composite)
        warnings.update(s.warnings)
        for gold_type, predicted in s.measurement_types:
            confusion.setdefault(gold_type, Counter())[predicted] += 1
    tp, fp, fn = composite["tp"], composite["fp"], composite["fn"]
    rates = [f["normalised"]["rate"] for f in fields.values() if f["normalised"]["rate"] is not None]
    return {
        "items": items,
        "gold_endpoints": endpoints,
        "status": {key: statuses.get(key, 0) for key in ("valid", "invalid", "error", "missing")},
        "schema_valid": _ratio(statuses["valid"], items),
        "endpoint_count": {
            "exact": _ratio(exact, items),
            "over": _ratio(over, items),
            "under": _ratio(len(answered) - exact - over, items),
        },
        "second_endpoint_on_single": _ratio(
            sum((s.predicted_endpoints or 0) >= 2 for s in singles), len(singles)
        ),
        "fields": fields,
        "field_mean_normalised": round(sum(rates) / len(rates), 4) if rates else None,
        "composite": {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        },
        "measurement_type": {
            "accuracy": fields["measurement_type"]["exact"],
            "confusion": {g: dict(sorted(c.items())) for g, c in sorted(confusion.items())},
        },
        "grounding": {
            "warnings": {rule: warnings.get(rule, 0) for rule in GROUNDING_RULES},
            "items_with_warnings": _ratio(sum(bool(s.warnings) for s in scores), len(answered)),
        },
    }


def score(gold: Sequence[GoldItem], predictions: dict[str, Prediction]) -> dict[str, Any]:
    """Score predictions against gold: the whole report (see the module docstring)."""
    scores = [score_item(item, predictions.get(item.id)) for item in gold]
    report = summarise(scores)
    report["by_kind"] = {}
    for kind in sorted({s.kind for s in scores}):
        part = summarise([s for s in scores if s.kind == kind])
        report["by_kind"][kind] = {
            key: part[key] for key in ("items", "schema_valid", "endpoint_count", "field_mean_normalised")
        }
    report["items_detail"] = [
        {
            "id": s.id,
            "status": s.status,
            "gold_endpoints": s.gold_endpoints,
            "predicted_endpoints": s.predicted_endpoints,
            "reason": predictions[s.id].reason if s.id in predictions else None,
            "warnings": dict(s.warnings),
        }
        for s in scores
    ]
    return report


# --- comparing ----------------------------------------------------------------------------


def compare(gold: Sequence[GoldItem], a: dict[str, Prediction], b: dict[str, Prediction]) -> dict[str, Any]:
    """Agreement between two systems on the same gold inputs, and every disagreement."""
    exact, normalised = Counter[str](), Counter[str]()
    slots = pairs = both_valid = same_count = same_status = 0
    disagreements: list[dict[str, Any]] = []
    for item in gold:
        pa, pb = a.get(item.id), b.get(item.id)
        status_a, status_b = pa.status if pa else "missing", pb.status if pb else "missing"
        same_status += (status_a == "valid") == (status_b == "valid")
        if not (pa and pa.output and pb and pb.output):
            if (status_a == "valid") != (status_b == "valid"):
                disagreements.append({"id": item.id, "field": "schema_valid", "a": status_a, "b": status_b})
            continue
        both_valid += 1
        ea, eb = pa.output.endpoints, pb.output.endpoints
        if len(ea) == len(eb):
            same_count += 1
        else:
            disagreements.append({"id": item.id, "field": "endpoint_count", "a": len(ea), "b": len(eb)})
        matched = align(ea, eb)
        slots += max(len(ea), len(eb))
        pairs += len(matched)
        for i, j in matched:
            for name in FIELDS:
                exact[name] += values_equal(ea[i], eb[j], name, normalised=False)
                if values_equal(ea[i], eb[j], name, normalised=True):
                    normalised[name] += 1
                else:
                    disagreements.append({
                        "id": item.id, "field": name, "a_endpoint": i, "b_endpoint": j,
                        "a": _plain(getattr(ea[i], name)), "b": _plain(getattr(eb[j], name)),
                    })  # fmt: skip
        for side, endpoints, taken in (
            ("a", ea, {i for i, _ in matched}),
            ("b", eb, {j for _, j in matched}),
        ):
            for k, endpoint in enumerate(endpoints):
                if k not in taken:
                    disagreements.append({
                        "id": item.id, "field": "endpoint", f"{side}_endpoint": k,
                        side: endpoint.endpoint_name_standardized, "only_in": side,
                    })  # fmt: skip
    return {
        "items": len(gold),
        "schema_valid_agreement": _ratio(same_status, len(gold)),
        "both_valid": both_valid,
        "endpoint_count_agreement": _ratio(same_count, both_valid),
        "endpoint_pairs": pairs,
        "endpoint_slots": slots,
        "fields": {
            name: {"exact": _ratio(exact[name], slots), "normalised": _ratio(normalised[name], slots)}
            for name in FIELDS
        },
        "disagreements": disagreements,
    }


# --- predicting ---------------------------------------------------------------------------


def predict(
    gold: Sequence[GoldItem],
    client: EndpointClient,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[dict[str, Any]]:
    """One prediction row per gold item, in gold order: {id, output} or {id, error[, raw]}, plus
    ``warnings`` when the client checks grounding."""
    rows: list[dict[str, Any]] = []
    for item, result in zip(
        gold, client.extract_many([g.text for g in gold], concurrency=concurrency), strict=True
    ):
        row: dict[str, Any] = {"id": item.id}
        if result.value is not None:
            row["output"] = result.value.model_dump(mode="json")
            if result.warnings:
                row["warnings"] = [asdict(w) for w in result.warnings]
        else:
            row["error"] = f"{type(result.error).__name__}: {result.error}"
            raw = getattr(result.error, "raw", None)
            if raw is not None:
                row["raw"] = raw
        rows.append(row)
    return rows


# --- output -------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    if not path.parent.is_dir():
        raise EvalInputError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pct(ratio: dict[str, Any]) -> str:
    if ratio["rate"] is None:
        return f"{ratio['count']}/{ratio['total']}      -"
    return f"{ratio['count']}/{ratio['total']} {100 * ratio['rate']:6.1f}%"


def _rate(ratio: dict[str, Any]) -> str:
    return "-" if ratio["rate"] is None else f"{100 * ratio['rate']:.1f}%"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first and "detail" columns left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    left = {0} | {i for i, h in enumerate(headers) if h == "detail"}
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_score(report: dict[str, Any]) -> str:
    status = report["status"]
    count = report["endpoint_count"]
    comp = report["composite"]
    ground = report["grounding"]
    headline = [
        ["schema-valid", _pct(report["schema_valid"]),
         f"invalid {status['invalid']}, error {status['error']}, missing {status['missing']}"],
        ["endpoint count exact", _pct(count["exact"]),
         f"over {count['over']['count']}, under {count['under']['count']}"],
        ["2nd endpoint on single-endpoint items", _pct(report["second_endpoint_on_single"]), "card's known failure"],
        ["composite precision / recall", f"{_fmt(comp['precision'])} / {_fmt(comp['recall'])}",
         f"tp {comp['tp']}, fp {comp['fp']}, fn {comp['fn']}"],
        ["measurement_type accuracy", _pct(report["measurement_type"]["accuracy"]), ""],
        ["grounding warnings", _pct(ground["items_with_warnings"]),
         ", ".join(f"{k} {v}" for k, v in ground["warnings"].items())],
    ]  # fmt: skip
    fields = [[name, _rate(f["exact"]), _rate(f["normalised"])] for name, f in report["fields"].items()]
    mean = report["field_mean_normalised"]
    fields.append(["mean", "", "-" if mean is None else f"{100 * mean:.1f}%"])
    kinds = [
        [kind, str(k["items"]), _rate(k["schema_valid"]), _rate(k["endpoint_count"]["exact"]),
         "-" if k["field_mean_normalised"] is None else f"{100 * k['field_mean_normalised']:.1f}%"]
        for kind, k in report["by_kind"].items()
    ]  # fmt: skip
    return "\n\n".join([
        f"{report['items']} items, {report['gold_endpoints']} gold endpoints",
        _table(["metric", "value", "detail"], headline),
        _table(["field (over gold endpoints)", "exact", "normalised"], fields),
        _table(["kind", "items", "valid", "count exact", "field mean"], kinds),
    ])  # fmt: skip


def render_compare(report: dict[str, Any], limit: int = SHOWN_DISAGREEMENTS) -> str:
    agreement = report["agreement"]
    a, b = report["a"]["score"], report["b"]["score"]
    rows = [
        ["schema-valid", _rate(a["schema_valid"]), _rate(b["schema_valid"]), _rate(agreement["schema_valid_agreement"]), ""],
        ["endpoint count exact", _rate(a["endpoint_count"]["exact"]), _rate(b["endpoint_count"]["exact"]),
         _rate(agreement["endpoint_count_agreement"]), ""],
    ]  # fmt: skip
    for name in FIELDS:
        rows.append([
            name, _rate(a["fields"][name]["normalised"]), _rate(b["fields"][name]["normalised"]),
            _rate(agreement["fields"][name]["exact"]), _rate(agreement["fields"][name]["normalised"]),
        ])  # fmt: skip
    listed = agreement["disagreements"]
    lines = [_describe(d) for d in listed[:limit]]
    if len(listed) > limit:
        lines.append(f"... {len(listed) - limit} more in the JSON report (--json)")
    return "\n\n".join([
        f"A {report['a']['pred']}\nB {report['b']['pred']}\n{agreement['items']} items, "
        f"{agreement['both_valid']} answered validly by both",
        _table(["field", "A vs gold", "B vs gold", "A=B exact", "A=B normalised"], rows),
        f"{len(listed)} disagreements" + (":\n" + "\n".join(lines) if lines else ""),
    ])  # fmt: skip


def _describe(d: dict[str, Any]) -> str:
    if d["field"] == "endpoint":
        side = d["only_in"]
        return f"{d['id']}  endpoint {d[f'{side}_endpoint']} only in {side.upper()}: {d[side]!r}"
    if "a_endpoint" in d:
        return f"{d['id']}  [{d['a_endpoint']}|{d['b_endpoint']}] {d['field']}: A {d['a']!r}  B {d['b']!r}"
    return f"{d['id']}  {d['field']}: A {d['a']!r}  B {d['b']!r}"


# --- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.eval", description="Extraction quality: predict, score, compare."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("predict", help="run a server over the gold texts, write predictions JSONL")
    run.add_argument("--gold", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True, help="predictions JSONL to write")
    run.add_argument("--base-url", default=None, help="server URL (default: ENDPOINT_BASE_URL or local)")
    run.add_argument("--api-key", default=None, help="bearer token (default: ENDPOINT_API_KEY)")
    run.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    run.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    run.add_argument("--limit", type=int, default=None, help="only the first N gold items")
    run.add_argument("--grounding", action="store_true", help="add client grounding warnings to each row")

    grade = commands.add_parser("score", help="score predictions against the gold set")
    grade.add_argument("--gold", type=Path, required=True)
    grade.add_argument("--pred", type=Path, required=True)
    grade.add_argument("--json", type=Path, default=None, help="write the full report here")
    grade.add_argument("--subset", action="store_true", help="score only the gold items PRED has rows for")

    both = commands.add_parser("compare", help="compare two systems' predictions on the same gold set")
    both.add_argument("--gold", type=Path, required=True)
    both.add_argument("--a", type=Path, required=True, help="predictions of system A")
    both.add_argument("--b", type=Path, required=True, help="predictions of system B")
    both.add_argument("--json", type=Path, default=None, help="write the full report here")
    both.add_argument("--subset", action="store_true", help="only the gold items both files have rows for")
    return parser


def _write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        write_atomic(path, lambda handle: json.dump(report, handle, indent=2, ensure_ascii=False))


def _run_predict(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise EvalInputError("--limit must be >= 1")
    if args.concurrency < 1:
        raise EvalInputError("--concurrency must be >= 1")
    gold = load_gold(args.gold)[: args.limit]
    if not args.out.parent.is_dir():
        raise EvalInputError(f"{args.out}: folder {args.out.parent} does not exist")
    started = time.monotonic()
    with EndpointClient(
        args.base_url,
        api_key=args.api_key,
        model=args.model,
        grounding=args.grounding,
        max_connections=max(64, args.concurrency),
    ) as client:
        rows = predict(gold, client, concurrency=args.concurrency)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(args.out, lambda handle: handle.write(lines))
    failed = [row for row in rows if "error" in row]
    print(
        f"{len(rows)} items, {len(failed)} errors, {time.monotonic() - started:.1f}s -> {args.out}",
        file=sys.stderr,
    )
    if failed and len(failed) == len(rows):
        print(f"eval: error: every request failed, first: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def _restrict(gold: list[GoldItem], *sides: dict[str, Prediction]) -> list[GoldItem]:
    kept = [item for item in gold if all(item.id in side for side in sides)]
    if not kept:
        raise EvalInputError("--subset: the predictions cover no gold item")
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "predict":
            return _run_predict(args)
        gold = load_gold(args.gold)
        if args.command == "score":
            predictions = load_predictions(args.pred, gold)
            if args.subset:
                gold = _restrict(gold, predictions)
            report = {"gold": str(args.gold), "pred": str(args.pred), **score(gold, predictions)}
            _write_json(args.json, report)
            print(render_score(report))
        else:
            a, b = load_predictions(args.a, gold), load_predictions(args.b, gold)
            if args.subset:
                gold = _restrict(gold, a, b)
            report = {
                "gold": str(args.gold),
                "a": {"pred": str(args.a), "score": score(gold, a)},
                "b": {"pred": str(args.b), "score": score(gold, b)},
                "agreement": compare(gold, a, b),
            }
            _write_json(args.json, report)
            print(render_compare(report))
    except EvalInputError as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

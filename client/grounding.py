"""Grounding checks: flag extracted values the input text gives no lexical basis for.

Advisory and off by default. The extraction is never changed: each finding is a
``GroundingWarning`` returned beside it. The rules aim at the model card's two known failures
(a ``measurement_method`` the text never names, a hallucinated extra endpoint) and at invented
timeframes. They are lexical, so they catch invented values, not wrong readings of named ones.

Text. Registry field labels ("[Time Frame:", "Measure method of outcome:", "E.5.1 Primary end
point(s):", "测量方法：" ...) are removed first: a label is not evidence for a value.

Tokens. Text and values are tokenised the same way: Unicode NFKC, case-folded, then split into
runs of letters, runs of digits and single CJK characters; punctuation and symbols separate
tokens and are dropped ("TNF-α" -> tnf α; "v1.1" -> v 1 1). A trailing plural "s" is removed
(weeks -> week) and time-unit abbreviations are spelled out (wk -> week, h -> hour). Content
tokens are the tokens minus a short list of function words; *required* tokens are the numbers
and time units (day, week, month, year, hour, minute, 天, 周, 月, 年, 日) among them.

A token of a value *matches* the text when the text has the same token, or a token sharing a
prefix of at least 5 characters and at least 3/4 of the shorter one's length (spirometric ~
spirometry; immunohistochemistry is not immunosorbent). Required tokens must be equal.

A value is *supported* when either
  1. its token sequence occurs contiguously in the text's token sequence, or
  2. every required token of it occurs in the text and at least half of its other distinct
     content tokens match the text.
A value written "long form (ABBR)", ABBR one word with two or more capitals, is also supported
when either form alone is: "Dual-energy X-ray absorptiometry (DXA)" is named by a text that says
only "DXA". Other parenthesised parts ("(8 weeks)") stay part of the value.

Rules (``GroundingWarning.rule``):
  - ``measurement_method``: a non-null measurement_method that is not supported.
  - ``timeframe``: a non-null timeframe that is not supported.
  - ``extra_endpoint``: in an answer with several endpoints, endpoint k >= 1 whose own words
    (content tokens of its endpoint_name_standardized and measurement_of that no earlier endpoint
    uses) are empty, i.e. it repeats an earlier endpoint, or for which neither the name nor
    measurement_of (in any form above), restricted to its own words, is supported. The first
    endpoint is never flagged by this rule: some endpoint must be the answer.

Cross-script values are not judged: when the text contains CJK characters and the value
contains none (an English label for a Chinese registry entry), no lexical rule can tell a
translation from an invention, so the value gets no warning.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from client.models import Endpoint, EndpointExtraction

GroundingRule = Literal["measurement_method", "timeframe", "extra_endpoint"]

MIN_SHARE = 0.5
PREFIX_MIN = 5
PREFIX_SHARE = 0.75

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|\d+|[^\W\d_{_CJK}]+")
_HAS_CJK = re.compile(rf"[{_CJK}]")
_ABBREVIATION = re.compile(r"[(（]\s*([^\s()（）]*[A-Z][^\s()（）]*[A-Z][^\s()（）]*)\s*[)）]")
_REGISTRY_LABELS = re.compile(
    r"\btime\s*frame\s*:|\bmeasure\s+(?:time\s+point|method)\s+of\s+outcome\s*:|\boutcome\s*:"
    r"|\btype\s*:|\b(?:primary|secondary|other)\s+indicator\b"
    r"|\be\.\d+(?:\.\d+)*\b|\b(?:primary|secondary)\s+end\s*point\(?s?\)?\s*:"
    r"|\btime\s*point\(?s?\)?\s+of\s+evaluation\s+of\s+this\s+end\s*point\s*:"
    r"|(?:主要|次要|其他)结局指标|测量时间点|测量方法|指标类型",
    re.IGNORECASE,
)
_FUNCTION_WORDS = frozenset(
    {"a", "an", "and", "as", "at", "by", "for", "from", "in", "into", "of", "on", "or", "per", "the"}
    | {"to", "via", "with", "within", "using"}
)
_UNIT_SPELLING = {
    "h": "hour",
    "hr": "hour",
    "min": "minute",
    "d": "day",
    "wk": "week",
    "mo": "month",
    "yr": "year",
}
_TIME_UNITS = frozenset({"minute", "hour", "day", "week", "month", "year", "天", "周", "月", "年", "日"})


@dataclass(frozen=True)
class GroundingWarning:
    """One value of an extraction that the input text does not support."""

    rule: GroundingRule
    endpoint: int
    field: str
    value: str | None
    message: str

    def __str__(self) -> str:
        return f"endpoints[{self.endpoint}].{self.field}: {self.message}"


def tokens(text: str) -> list[str]:
    """The grounding tokens of ``text`` (see the module docstring)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return [_canonical(t) for t in _TOKEN.findall(folded)]


def _canonical(token: str) -> str:
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        token = token[:-1]
    return _UNIT_SPELLING.get(token, token)


def _required(token: str) -> bool:
    return token.isdigit() or token in _TIME_UNITS


def _content(toks: Iterable[str]) -> set[str]:
    return {t for t in toks if t not in _FUNCTION_WORDS}


def _prefix_match(a: str, b: str) -> bool:
    shorter = min(len(a), len(b))
    common = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common += 1
    return common >= PREFIX_MIN and common >= PREFIX_SHARE * shorter


class _Text:
    """The input text, tokenised once for every rule."""

    def __init__(self, text: str) -> None:
        self.tokens = tokens(_REGISTRY_LABELS.sub(" | ", unicodedata.normalize("NFKC", text)))
        self.vocabulary = set(self.tokens)
        self.joined = f" {' '.join(self.tokens)} "
        self.has_cjk = bool(_HAS_CJK.search(text))

    def matches(self, token: str) -> bool:
        if token in self.vocabulary:
            return True
        if _required(token) or len(token) < PREFIX_MIN:
            return False
        return any(_prefix_match(token, t) for t in self.vocabulary if not t.isdigit())

    def judgeable(self, value: str) -> bool:
        return not (self.has_cjk and not _HAS_CJK.search(value))

    def supports(self, value_tokens: Iterable[str]) -> bool:
        """Either rule of the module docstring."""
        value_tokens = list(value_tokens)
        if not value_tokens:
            return False
        if f" {' '.join(value_tokens)} " in self.joined:
            return True
        content = _content(value_tokens)
        required = {t for t in content if _required(t)}
        if not required <= self.vocabulary:
            return False
        words = content - required
        if not words:
            return bool(required)
        return sum(self.matches(w) for w in words) >= MIN_SHARE * len(words)


def _value_warning(
    text: _Text, index: int, field: GroundingRule, value: str | None, what: str
) -> GroundingWarning | None:
    if value is None or not value.strip() or not text.judgeable(value):
        return None
    if any(text.supports(tokens(form)) for form in _forms(value)):
        return None
    return GroundingWarning(field, index, field, value, f"{what} {value!r} is not named in the text")


def _forms(value: str) -> list[str]:
    """The value; with an abbreviation in parentheses, also the long form and each abbreviation."""
    abbreviations = _ABBREVIATION.findall(value)
    return [value, _ABBREVIATION.sub(" ", value), *abbreviations] if abbreviations else [value]


def _extra_endpoint_warnings(text: _Text, endpoints: Sequence[Endpoint]) -> list[GroundingWarning]:
    found: list[GroundingWarning] = []
    earlier: set[str] = set()
    for index, endpoint in enumerate(endpoints):
        labels = [v for v in (endpoint.endpoint_name_standardized, endpoint.measurement_of) if v]
        words = _content(tokens(" ".join(labels)))
        own = words - earlier
        earlier |= words
        if index == 0 or not text.judgeable(" ".join(labels)):
            continue
        if not own:
            message = "endpoint repeats the endpoints before it (no words of its own)"
        elif not any(
            text.supports(t for t in tokens(form) if t in own) for label in labels for form in _forms(label)
        ):
            message = f"endpoint's own words ({', '.join(sorted(own))}) are not named in the text"
        else:
            continue
        name = endpoint.endpoint_name_standardized
        found.append(GroundingWarning("extra_endpoint", index, "endpoint_name_standardized", name, message))
    return found


def check_grounding(text: str, extraction: EndpointExtraction) -> list[GroundingWarning]:
    """Warnings for the values of ``extraction`` that ``text`` gives no basis for, in endpoint
    order. Pure: neither argument is changed."""
    source = _Text(text)
    found = _extra_endpoint_warnings(source, extraction.endpoints)
    for index, endpoint in enumerate(extraction.endpoints):
        for warning in (
            _value_warning(source, index, "measurement_method", endpoint.measurement_method, "method"),
            _value_warning(source, index, "timeframe", endpoint.timeframe, "timeframe"),
        ):
            if warning is not None:
                found.append(warning)
    return sorted(found, key=lambda w: w.endpoint)


__all__ = ["GroundingRule", "GroundingWarning", "check_grounding", "tokens"]

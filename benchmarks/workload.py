"""The benchmark workload: endpoint texts from the shipped corpus and the gold answers.

Texts come from ``data/corpus.jsonl`` (244 registry-style endpoint descriptions). The gold set
(``data/gold.jsonl``) pairs 66 texts with the answer the fine-tuned model should give; it serves as
the realistic output when a random-weight model is steered (see ``steer.py``) and as the measure of
compact against pretty-printed JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from client.models import EndpointExtraction

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus.jsonl"
GOLD = DATA / "gold.jsonl"


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    expected: EndpointExtraction | None = None


def load(path: Path) -> list[Item]:
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                expected = raw.get("expected")
                items.append(
                    Item(
                        id=str(raw["id"]),
                        text=str(raw["text"]),
                        expected=EndpointExtraction.model_validate(expected) if expected else None,
                    )
                )
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"{path}:{number}: not a workload item: {exc}") from None
    if not items:
        raise SystemExit(f"{path}: no items")
    return items


def minimal_json(extraction: EndpointExtraction) -> str:
    """No whitespace at all: what vLLM's guidance backend emits with ``disable_any_whitespace``."""
    return extraction.model_dump_json()


def spaced_json(extraction: EndpointExtraction) -> str:
    """One line, a space after each ``:`` and ``,``: what vLLM's xgrammar backend emits with
    ``disable_any_whitespace`` (xgrammar's default separators when no indent is given)."""
    return json.dumps(extraction.model_dump(mode="json"), ensure_ascii=False)


STYLES = {"minimal": minimal_json, "spaced": spaced_json}


_INLINE_LIST = re.compile(r"\[\s*((?:\"(?:[^\"\\]|\\.)*\"\s*,\s*)*\"(?:[^\"\\]|\\.)*\")\s*\]")


def card_pretty_json(extraction: EndpointExtraction) -> str:
    """What the seed's model writes (the model card's examples): two-space indentation, lists of
    strings on one line."""
    text = json.dumps(extraction.model_dump(mode="json"), indent=2, ensure_ascii=False)
    return _INLINE_LIST.sub(lambda m: "[" + re.sub(r"\s*,\s*", ", ", m.group(1)) + "]", text)


STYLES["pretty"] = card_pretty_json

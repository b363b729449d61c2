"""An E4B-shaped stand-in for the real model, for GPU benchmarks where real weights cannot be fetched.

    python benchmarks/stand_in.py OUT_DIR [--vocab 262144] [--text-only]

Writes google/gemma-4-E4B-it's full layout: ``config.json`` is the checkpoint's (serve/gemma4_layout.py:
``Gemma4ForConditionalGeneration``, text model of 42 layers, hidden 2560, per-layer embeddings, 18
KV-shared layers, head_dim 256/512, vision and audio towers, 280 soft tokens per image), with
``processor_config.json`` for vLLM's multimodal processor, ``generation_config.json`` and a byte-level
BPE tokenizer with Gemma 4's turn and media tokens and the demo's chat template. ``--text-only``
writes the language model alone (``Gemma4ForCausalLM``, what merge_adapter.py ``--text-only``
writes; the layout of the 2026-11-25 H100 runs). Serve it with ``--load-format dummy``: vLLM fills
the weights with random numbers, so the full layout exercises its multimodal loader and processor
on the real config's shapes.

The tokenizer is what makes the structured-output numbers realistic. A toy tokenizer of a few
hundred entries makes grammar masks trivially cheap; this one has the real vocabulary size, is
trained on endpoint text, registry prose, the gold answers in every JSON layout (minimal, spaced,
pretty) and a large pseudo-word lexicon
(general-purpose tokenizers hold mostly words that never appear in this domain), so JSON keys split
into several tokens and string contents look like they do under a general tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.workload import CORPUS, GOLD, STYLES, load  # noqa: E402
from merge_adapter import text_only_config  # noqa: E402
from serve import gemma4_layout  # noqa: E402
from serve.demo_model import media_token_ids, train_gemma4_tokenizer, write_processor_config  # noqa: E402

_SYLLABLES = [
    c + v + e
    for c in [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "st",
        "tr",
        "ch",
    ]
    for v in ["a", "e", "i", "o", "u", "ea", "io", "ou"]
    for e in ["", "n", "r", "s", "t", "l", "m"]
]


def _lines(seed: int) -> Iterator[str]:
    """Training text: the domain a hundred times over, then a Zipf-weighted pseudo-word lexicon."""
    corpus = [item.text for item in load(CORPUS)]
    gold = load(GOLD)
    for _ in range(100):
        yield from corpus
        for item in gold:
            yield item.text
            assert item.expected is not None
            # Every JSON layout a server or the seed may write, equally often, so none is favoured.
            yield from (style(item.expected) for style in STYLES.values())
    rng = random.Random(seed)
    lexicon = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(600_000)})
    rng.shuffle(lexicon)
    cumulative = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(lexicon))))
    for _ in range(60_000):
        words = rng.choices(lexicon, cum_weights=cumulative, k=40)
        yield " ".join(w.capitalize() if rng.random() < 0.1 else w for w in words)


def train_tokenizer(vocab_size: int, seed: int = 0):  # -> PreTrainedTokenizerFast
    return train_gemma4_tokenizer(_lines(seed), vocab_size)


def stand_in_config(tokenizer: Any, vocab_size: int, *, text_only: bool = False) -> dict[str, Any]:
    """The checkpoint's config.json with this tokenizer's token ids and vocabulary size."""
    turn_end = int(tokenizer.convert_tokens_to_ids("<turn|>"))
    text = {"vocab_size": vocab_size, "vocab_size_per_layer_input": vocab_size, "eos_token_id": [1, turn_end]}
    config = gemma4_layout.scaled(
        {**media_token_ids(tokenizer), "eos_token_id": [1, turn_end], "text_config": text}
    )
    return text_only_config(config, "bfloat16") if text_only else config


def write_stand_in(out: Path, vocab_size: int = 262144, *, text_only: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"stand_in: tokenizer has {len(tokenizer)} entries, more than vocab {vocab_size}")
    config = stand_in_config(tokenizer, vocab_size, text_only=text_only)
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    turn_end = int(tokenizer.convert_tokens_to_ids("<turn|>"))
    generation = {"bos_token_id": 2, "eos_token_id": [1, turn_end], "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation) + "\n")
    tokenizer.save_pretrained(out)
    if not text_only:
        soft_tokens = config["vision_config"]["default_output_length"]
        write_processor_config(out, soft_tokens=soft_tokens)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument(
        "--text-only",
        action="store_true",
        help="Gemma4ForCausalLM (language model only) instead of the full layout",
    )
    args = parser.parse_args()
    write_stand_in(args.out, args.vocab, text_only=args.text_only)
    tok_size = len(json.loads((args.out / "tokenizer.json").read_text())["model"]["vocab"])
    print(f"stand_in: wrote {args.out} (tokenizer: {tok_size} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

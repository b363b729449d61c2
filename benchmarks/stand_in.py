"""An E4B-shaped stand-in for the real model, for GPU benchmarks where real weights cannot be fetched.

    python benchmarks/stand_in.py OUT_DIR [--vocab 262144]

Writes ``config.json`` (google/gemma-4-E4B-it's text model: 42 layers, hidden 2560, per-layer
embeddings, 18 KV-shared layers, head_dim 256/512, vocab 262,144), ``generation_config.json`` and a
byte-level BPE tokenizer with Gemma 4's turn tokens and the demo's chat template. Serve it with
``--load-format dummy``: vLLM fills the weights with random numbers.

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.workload import CORPUS, GOLD, STYLES, load  # noqa: E402
from serve.demo_model import train_gemma4_tokenizer  # noqa: E402

E4B_TEXT_CONFIG: dict[str, object] = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 42,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "num_kv_shared_layers": 18,
    "hidden_size_per_layer_input": 256,
    "vocab_size_per_layer_input": 262144,
    "use_double_wide_mlp": False,
    "sliding_window": 512,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "attention_k_eq_v": False,
    "enable_moe_block": False,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "rope_parameters": {
        "full_attention": {
            "rope_type": "proportional",
            "rope_theta": 1000000.0,
            "partial_rotary_factor": 0.25,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(42)],
    "pad_token_id": 0,
    "eos_token_id": [1, 6],
    "bos_token_id": 2,
    "torch_dtype": "bfloat16",
}

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


def write_stand_in(out: Path, vocab_size: int = 262144) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"stand_in: tokenizer has {len(tokenizer)} entries, more than vocab {vocab_size}")
    config = {**E4B_TEXT_CONFIG, "vocab_size": vocab_size, "vocab_size_per_layer_input": vocab_size}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    generation = {"bos_token_id": 2, "eos_token_id": [1, 6], "pad_token_id": 0}
    (out / "generation_config.json").write_text(json.dumps(generation) + "\n")
    tokenizer.save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=int, default=262144)
    args = parser.parse_args()
    write_stand_in(args.out, args.vocab)
    tok_size = len(json.loads((args.out / "tokenizer.json").read_text())["model"]["vocab"])
    print(f"stand_in: wrote {args.out} (tokenizer: {tok_size} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

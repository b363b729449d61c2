"""Steer a random-weight model to a known answer: a benchmark workload, never a product feature.

Random weights under a JSON grammar write strings that never close, so their guided-decoding numbers
measure a pathology. The real fine-tuned model writes short endpoint JSON. To measure that
workload without its weights, a request names the answer it should produce and a logits processor
adds a large bias to that answer's next token at every step, then to EOS. Nothing else changes: the
grammar mask is applied before this processor (a masked token stays at -inf, so the grammar still
decides), and every request pays the same per-step cost whether guided or free.

Served with ``--logits-processors benchmarks.steer:SteerToText``; a request opts in with
``{"vllm_xargs": {"steer_text": "<the answer>"}}``. The product's schema policy refuses
``vllm_xargs`` on guided requests (a custom processor runs after the grammar mask), so to measure
the path users get the server can instead steer by prompt: with ``STEER_FROM_PROMPT=minimal`` (a
``workload.STYLES`` name) in its environment, a request without ``steer_text`` whose prompt holds a
gold text is steered to that text's gold answer in that style, and no request parameter is needed.
``HFSteer`` does the same for transformers' ``generate`` (the seed baseline).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

STEER_KEY = "steer_text"
# Random-weight logits are within a few units of each other; this makes the target the argmax of
# whatever the grammar allows.
STEER_BIAS = 1.0e4
STEER_FROM_PROMPT_ENV = "STEER_FROM_PROMPT"

try:  # vLLM is only present where the server runs.
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
except ImportError:  # pragma: no cover - the HF half of this module works without vLLM
    LogitsProcessor = object  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


def _eos_id(tokenizer: Any) -> int:
    return int(tokenizer.eos_token_id)


def gold_targets(style: str) -> list[tuple[str, str]]:
    """(gold text, its answer in ``style``), longest text first, so a text that holds another
    is matched before it."""
    from benchmarks.workload import GOLD, STYLES, load

    if style not in STYLES:
        raise ValueError(f"{STEER_FROM_PROMPT_ENV}={style!r}: expected one of {', '.join(STYLES)}")
    pairs = [(i.text, STYLES[style](i.expected)) for i in load(GOLD) if i.expected is not None]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def target_for_prompt(prompt: str, targets: list[tuple[str, str]]) -> str | None:
    return next((answer for text, answer in targets if text in prompt), None)


class SteerToText(LogitsProcessor):  # type: ignore[misc,valid-type]
    """vLLM v1 logits processor: for requests carrying ``steer_text``, bias the next token of
    that text (tokenized once, when the request joins the batch), then EOS."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.eos = _eos_id(self.tokenizer)
        self.device = device
        self.pin_memory = is_pin_memory
        # batch index -> (target token ids ending in EOS, the request's live output token list)
        self.entries: dict[int, tuple[list[int], list[int]]] = {}
        style = os.environ.get(STEER_FROM_PROMPT_ENV)
        self.by_prompt = gold_targets(style) if style else []

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        value = (params.extra_args or {}).get(STEER_KEY)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"vllm_xargs.{STEER_KEY} must be a string")

    def is_argmax_invariant(self) -> bool:
        return False

    def _new_state(
        self, params: SamplingParams, prompt: list[int] | None, output: list[int]
    ) -> tuple[list[int], list[int]] | None:
        text = (params.extra_args or {}).get(STEER_KEY)
        if text is None and self.by_prompt and prompt:
            text = target_for_prompt(self.tokenizer.decode(prompt), self.by_prompt)
        if text is None:
            return None
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.eos], output

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.entries, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.entries:
            return logits
        rows, cols = [], []
        for row, (target, output) in self.entries.items():
            rows.append(row)
            cols.append(target[min(len(output), len(target) - 1)])
        index = torch.tensor([rows, cols], dtype=torch.long, pin_memory=self.pin_memory)
        index = index.to(logits.device, non_blocking=True)
        logits[index[0], index[1]] += STEER_BIAS
        return logits


class HFSteer:
    """transformers ``LogitsProcessor`` twin of ``SteerToText`` for one unpadded sequence."""

    def __init__(self, target_ids: list[int], prompt_len: int, eos: int) -> None:
        self.target = [*target_ids, eos]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = input_ids.shape[1] - self.prompt_len
        scores[:, self.target[min(k, len(self.target) - 1)]] += STEER_BIAS
        return scores

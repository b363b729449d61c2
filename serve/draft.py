"""Speculative drafts from the endpoint grammar, then from the prompt.

An extraction is compact endpoint JSON whose keys come in a fixed order, so after each value the
grammar alone decides the next characters: ``","measurement_of":"`` after the first string, ``null``
or ``false`` where a type allows nothing else. xgrammar says what is forced
(``GrammarMatcher.find_jump_forward_string``); this drafter proposes those characters' tokens, and
where nothing is forced (inside a value) the tokens that followed the last few in the prompt, as
vLLM's ``ngram`` method does, since values are mostly copied from the endpoint text. vLLM verifies
every draft against the target model under the same grammar, so answers are the same with or
without it under greedy decoding; only the number of engine steps changes.

    python -m serve ... --draft grammar        # serve/launcher.py's speculative_config():
    # --speculative-config '{"method": "custom_class", "model": "serve.draft.GrammarDrafter", ...}'

vLLM builds the drafter inside its model runner and calls ``propose`` with the batch's token rows
only; the drafter reads the request ids, prompt lengths and structured-output parameters from the
runner that built it (vLLM marks its custom-proposer interface experimental).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.grammar import endpoint_grammar

# Prompt lookup: the longest and shortest suffix of the answer so far that is looked up.
LOOKUP_MAX = 5
LOOKUP_MIN = 2


def prompt_lookup(tokens: np.ndarray, k: int, max_n: int = LOOKUP_MAX, min_n: int = LOOKUP_MIN) -> list[int]:
    """The ``k`` tokens that followed the first earlier occurrence of the longest suffix of
    ``tokens`` (``max_n`` down to ``min_n`` long); none if no suffix recurs."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: size - 1], n)
        hits = np.flatnonzero((windows == tokens[size - n :]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return [int(t) for t in tokens[start : start + k]]
    return []


@dataclass
class _Request:
    """One request's grammar matcher and how many of its output tokens it has consumed."""

    matcher: Any | None  # None: no endpoint grammar (or it refused a token): prompt lookup only
    consumed: int = 0


class GrammarDrafter:
    """vLLM ``custom_class`` proposer: grammar-forced tokens first, prompt lookup after them."""

    def __init__(self, vllm_config: Any) -> None:
        import xgrammar
        from transformers import AutoTokenizer

        spec = vllm_config.speculative_config
        model = vllm_config.model_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(model.max_model_len)
        self.runner = _building_runner()
        self.tokenizer = AutoTokenizer.from_pretrained(
            model.tokenizer, trust_remote_code=model.trust_remote_code
        )
        info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=model.get_vocab_size())
        self.grammar_text = endpoint_grammar()
        self.grammar = xgrammar.GrammarCompiler(info).compile_grammar(self.grammar_text)
        self.new_matcher = lambda: xgrammar.GrammarMatcher(self.grammar)
        self.requests: dict[str, _Request] = {}
        self.encoded: dict[str, list[int]] = {}

    def load_model(self, _target: Any) -> None:
        """Nothing to load (vLLM's CPU runner calls this on every drafter, as on ngram's)."""

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        **_: Any,
    ) -> list[list[int]]:
        batch = self.runner.input_batch
        drafts: list[list[int]] = []
        for row, req_id in enumerate(batch.req_ids):
            end = int(num_tokens_no_spec[row])
            room = min(self.k, self.max_model_len - end - 1)
            if not sampled_token_ids[row] or room <= 0:  # still prefilling, or no room left
                drafts.append([])
                continue
            tokens = token_ids_cpu[row, :end]
            forced = self._forced(req_id, tokens, int(batch.num_prompt_tokens[row]))[:room]
            if len(forced) < room:
                forced += prompt_lookup(
                    np.concatenate([tokens, forced]) if forced else tokens, room - len(forced)
                )
            drafts.append(forced)
        for gone in self.requests.keys() - set(batch.req_ids):
            del self.requests[gone]
        return drafts

    def _forced(self, req_id: str, tokens: np.ndarray, prompt_len: int) -> list[int]:
        """The tokens of what the endpoint grammar forces after this request's output so far."""
        state = self.requests.get(req_id)
        if state is None:
            state = self.requests[req_id] = _Request(
                self.new_matcher() if self._is_endpoint(req_id) else None
            )
        if state.matcher is None:
            return []
        for token in tokens[prompt_len + state.consumed :]:
            if not state.matcher.accept_token(int(token)):
                state.matcher = None  # out of step with vLLM's matcher: stop drafting from it
                return []
            state.consumed += 1
        if state.matcher.is_terminated():
            return []
        text = state.matcher.find_jump_forward_string()
        if not text:
            return []
        if text not in self.encoded:
            self.encoded[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return list(self.encoded[text])

    def _is_endpoint(self, req_id: str) -> bool:
        params = self.runner.requests[req_id].sampling_params
        so = getattr(params, "structured_outputs", None)
        return so is not None and so.grammar == self.grammar_text


def _building_runner() -> Any:
    """The model runner whose constructor is building this drafter (vLLM passes only its config)."""
    for frame in inspect.stack()[2:12]:
        candidate = frame.frame.f_locals.get("self")
        # Its request table and batch are made after the drafter; they are read at propose time.
        if type(candidate).__name__.endswith("ModelRunner") and hasattr(candidate, "speculative_config"):
            return candidate
    raise RuntimeError(
        "serve.draft.GrammarDrafter must be built by vLLM's model runner "
        '(--speculative-config \'{"method": "custom_class", "model": "serve.draft.GrammarDrafter", ...}\')'
    )

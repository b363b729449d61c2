"""Steering that survives speculative decoding: a benchmark workload, never a product feature.

vLLM refuses custom logits processors when speculative decoding is on ("Custom logits processors
are not supported when speculative decoding is enabled"), so ``steer.SteerToText`` cannot steer a
server that drafts. This module does the same steering one level lower: loaded into the worker with

    --worker-extension-cls benchmarks.steer_spec.SteerWorkerExtension

it wraps the model runner's ``_sample`` so that, after the grammar bitmask and before sampling or
verification, every logits row gets ``STEER_BIAS`` on the answer's token for that row's position.
Without drafts a request has one row, for output position ``len(output)``; with ``k`` drafts it has
``k + 1`` rows, for positions ``len(output) .. len(output) + k`` (the draft rows are the target's
choice after each drafted token; once a draft differs from the answer, the rows after it are
rejected anyway). So the target writes the answer with or without a drafter, and what a drafter gets
accepted is what it would get from a model that writes the gold answers.

The answer comes from ``vllm_xargs.steer_text`` (schema policy off) or, with
``STEER_FROM_PROMPT=<style>`` in the server's environment, from the gold text in the prompt (the
path users get: no request parameter). Only the length of the output list is read, never its
values, so async scheduling's placeholders count as the positions they stand for.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.steer import STEER_BIAS, STEER_FROM_PROMPT_ENV, STEER_KEY, gold_targets, target_for_prompt


class _Steering:
    def __init__(self, runner: Any) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(runner.vllm_config.model_config.tokenizer)
        self.eos = int(self.tokenizer.eos_token_id)
        style = os.environ.get(STEER_FROM_PROMPT_ENV)
        self.by_prompt = gold_targets(style) if style else []
        self.targets: dict[str, list[int] | None] = {}

    def target(self, runner: Any, req_id: str) -> list[int] | None:
        if req_id not in self.targets:
            state = runner.requests[req_id]
            text = ((state.sampling_params and state.sampling_params.extra_args) or {}).get(STEER_KEY)
            if text is None and self.by_prompt and state.prompt_token_ids:
                text = target_for_prompt(self.tokenizer.decode(state.prompt_token_ids), self.by_prompt)
            ids = None if text is None else self.tokenizer.encode(text, add_special_tokens=False) + [self.eos]
            # Finished requests are not announced here; a bounded cache is enough for a benchmark.
            if len(self.targets) > 100_000:
                self.targets.clear()
            self.targets[req_id] = ids
        return self.targets[req_id]

    def apply(self, runner: Any, logits: torch.Tensor, num_drafts: list[int] | None) -> None:
        batch = runner.input_batch
        rows, cols = [], []
        row = 0
        for index, req_id in enumerate(batch.req_ids):
            width = 1 + (num_drafts[index] if num_drafts is not None else 0)
            target = self.target(runner, req_id)
            if target is not None:
                done = len(batch.req_output_token_ids[index] or ())
                for j in range(width):
                    rows.append(row + j)
                    cols.append(target[min(done + j, len(target) - 1)])
            row += width
        if rows:
            index_t = torch.tensor([rows, cols], dtype=torch.long).to(logits.device, non_blocking=True)
            logits[index_t[0], index_t[1]] += STEER_BIAS


def _install() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_steer_installed", False):
        return
    original = GPUModelRunner._sample

    def _sample(self: Any, logits: torch.Tensor | None, spec_decode_metadata: Any) -> Any:
        if logits is not None:
            steering = self.__dict__.get("_steering")
            if steering is None:
                steering = self.__dict__["_steering"] = _Steering(self)
            drafts = None if spec_decode_metadata is None else list(spec_decode_metadata.num_draft_tokens)
            steering.apply(self, logits, drafts)
        return original(self, logits, spec_decode_metadata)

    GPUModelRunner._sample = _sample  # type: ignore[method-assign]
    GPUModelRunner._steer_installed = True  # type: ignore[attr-defined]


class SteerWorkerExtension:
    """Named by ``--worker-extension-cls``; importing this module in the worker installs the
    steering. It adds no methods of its own (vLLM mixes it into the worker class)."""


_install()

"""--verify's checks, under the name they had before the merge/ package: merge/verify.py (the
scales and the weights) and merge/logits.py (the logits) hold them now. Kept so that
``import verify_merge`` goes on working; merge_adapter.py imports merge.verify, not this."""

from __future__ import annotations

from merge.logits import (
    FP32_ATOL,
    FP32_RTOL,
    MAX_KL_SHARE_OF_ADAPTER,
    MIN_KL_BOUND,
    MIN_TOP1_AGREEMENT,
    VERIFY_TEXTS,
    attach_lora,
    compare,
    judge,
    load_model,
    logits,
    prompt_ids,
)
from merge.verify import FP32_TINY, FP32_U, _check_merged, check_weights, merge_slack, verify

__all__ = [
    "FP32_ATOL",
    "FP32_RTOL",
    "FP32_TINY",
    "FP32_U",
    "MAX_KL_SHARE_OF_ADAPTER",
    "MIN_KL_BOUND",
    "MIN_TOP1_AGREEMENT",
    "VERIFY_TEXTS",
    "_check_merged",
    "attach_lora",
    "check_weights",
    "compare",
    "judge",
    "load_model",
    "logits",
    "merge_slack",
    "prompt_ids",
    "verify",
]

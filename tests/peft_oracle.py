"""Reference computations with PEFT itself, the test oracle for the merge."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_base(base: Path) -> torch.nn.Module:
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()


def peft_model(base: Path, adapter: Path) -> torch.nn.Module:
    """The base with the adapter attached, unmerged. PEFT cannot wrap Gemma4ClippableLinear (why
    the model card monkey-patches it), so the tower LoRA targets the wrapped nn.Linear instead:
    the same weight, reached under its real name."""
    import json

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    config = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=0.0,
        use_rslora=cfg.get("use_rslora", False),
        rank_pattern=cfg.get("rank_pattern") or {},
        alpha_pattern=cfg.get("alpha_pattern") or {},
        target_modules=rf".*language_model.*\.{TARGETS}|.*(vision|audio)_tower.*\.{TARGETS}\.linear",
    )
    model = get_peft_model(load_base(base), config)
    state = {}
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        if "language_model" not in key:
            key = re.sub(r"\.lora_([AB])\.weight$", r".linear.lora_\1.weight", key)
        state[key] = value
    result = set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys if "lora" in k], result.unexpected_keys
    return model.eval()


def last_token_logprobs(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)

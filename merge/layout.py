"""What the output checkpoint is called and configured as, in the full and the text-only layout."""

from __future__ import annotations

from typing import Any

from merge.errors import MergeError

LM_PREFIX = "model.language_model."
# Files copied from the base as they are. Processor files only matter for the multimodal layout.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
# --dtype -> config.json's "dtype", which transformers' dtype="auto" (and vLLM) load the weights as.
CONFIG_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def architecture_class(architectures: object) -> tuple[object, type[Any] | None]:
    """config.json's first architecture, and the transformers model class of that name (None where
    transformers has none)."""
    import torch
    import transformers

    architecture = architectures[0] if isinstance(architectures, list) and architectures else architectures
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        return architecture, None
    return architecture, model_class


def is_language_model(key: str) -> bool:
    return key.startswith(LM_PREFIX) or key == "lm_head.weight"


def output_name(key: str, text_only: bool) -> str | None:
    """Output tensor name, or None when the tensor is dropped (towers in a text-only export)."""
    if not text_only:
        return key
    if key.startswith(LM_PREFIX):
        return "model." + key[len(LM_PREFIX) :]
    if key == "lm_head.weight":
        return key
    return None


def text_only_config(config: dict[str, Any], dtype_name: str | None) -> dict[str, Any]:
    text = config.get("text_config")
    if not isinstance(text, dict) or not text:
        raise MergeError("base config.json has no text_config; is it a Gemma 4 checkpoint?")
    text = dict(text)
    text["architectures"] = ["Gemma4ForCausalLM"]
    text["model_type"] = "gemma4_text"
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    if dtype_name:
        text["dtype"] = dtype_name
    return text


def output_config(config: dict[str, Any], dtype_name: str, text_only: bool) -> dict[str, Any]:
    """config.json of the output: the text-only one, or the base's with the output dtype."""
    out_dtype = CONFIG_DTYPES.get(dtype_name)
    if text_only:
        return text_only_config(config, out_dtype)
    out = dict(config)
    if out_dtype:
        out["dtype"] = out_dtype
    return out

"""The request policy that ``serve/middleware.py`` applies to each POST body it has read: the
schema policy (``--schema-policy off|default|force``) and the token limits.

``Policy.decide`` takes a route and a parsed JSON body and returns the body as vLLM should see it
(the endpoint schema added where it applies), or raises PolicyError with the 400 to send. It knows
nothing of ASGI, keys or how the body arrived.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from client.models import endpoint_json_schema
from serve.grammar import compact_grammar_applies, endpoint_grammar, grammar_structured_outputs

CHAT_PATH = "/v1/chat/completions"
CHAT_PATHS = (CHAT_PATH, "/v1/chat/completions/batch")
COMPLETIONS_PATH = "/v1/completions"
SAGEMAKER_PATH = "/invocations"  # vLLM routes it to chat or completions by the body's shape
GENERATION_PATHS = (*CHAT_PATHS, COMPLETIONS_PATH, SAGEMAKER_PATH)
# POST routes that generate nothing. Under `force` every other POST route would return text the
# policy does not constrain (/v1/responses, /v1/messages, /inference/v1/generate, /v1/systemone,
# audio, and whatever a later vLLM adds), so all of them are closed.
NON_GENERATING_PATHS = (
    "/tokenize",
    "/detokenize",
    "/ping",
    "/v1/chat/completions/render",
    "/v1/chat/completions/derender",
    "/v1/completions/render",
    "/v1/completions/derender",
    "/v1/messages/count_tokens",
)
TOKEN_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
COUNT_KEYS = (*TOKEN_LIMIT_KEYS, "n", "best_of")
FORMAT_KEYS = ("response_format", "structured_outputs")
# Where the endpoint schema applies, the only parameters accepted: each leaves vLLM's grammar in
# force from the first generated token to the last and returns nothing but the generated text (and,
# for logprobs, scores vLLM computes after the grammar mask: sample_tokens applies the bitmask to
# the logits before the sampler computes logprobs, so every alternative outside the grammar has
# -inf). Everything else is refused by name, new vLLM parameters included. Refused on purpose:
# use_beam_search (vLLM drops the grammar for beam search), echo and prompt_logprobs (prompt text
# and the unconstrained model's choices), suffix, stop* (cut the JSON), chat_template*,
# reasoning_effort, continue_final_message/add_generation_prompt (the prompt's shape), logit_bias,
# allowed_token_ids, bad_words, min_tokens, ignore_eos, vllm_xargs (custom logits processors run
# after the mask), tools, kv_transfer_params, prompt_embeds, priority, cache_salt.
COMMON_PARAMS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stream",
    "stream_options", "user", "request_id", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs", *FORMAT_KEYS,
})  # fmt: skip
ALLOWED_PARAMS = {
    "chat": COMMON_PARAMS | {"messages", "max_completion_tokens", "top_logprobs"},
    "completions": COMMON_PARAMS | {"prompt"},
}
# Values that change nothing (vLLM's defaults, and the client's own thinking-off), accepted for any
# parameter so that SDKs which send defaults explicitly still work. Compared as JSON text, so `0`
# is not `false`.
NEUTRAL_VALUES = {
    "echo": ("false",), "use_beam_search": ("false",), "add_generation_prompt": ("true",),
    "continue_final_message": ("false",), "ignore_eos": ("false",), "include_stop_str_in_output": ("false",),
    "skip_special_tokens": ("true",), "spaces_between_special_tokens": ("true",), "min_tokens": ("0",),
    "stop": ("null", "[]"), "stop_token_ids": ("null", "[]"), "logit_bias": ("null", "{}"),
    "bad_words": ("null", "[]"), "tools": ("null",), "tool_choice": ("null", '"none"'),
    "prompt_logprobs": ("null",), "chat_template_kwargs": ("null", "{}", '{"enable_thinking": false}'),
    "best_of": ("null", "1"), "length_penalty": ("1.0", "1"), "priority": ("0",),
}  # fmt: skip


class PolicyError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def schema_response_format() -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "EndpointExtraction", "schema": endpoint_json_schema(), "strict": True},
    }


def _brings_format(body: dict[str, Any]) -> bool:
    return any(body.get(key) is not None for key in FORMAT_KEYS)


def _is_endpoint_format(body: dict[str, Any]) -> bool:
    """Whether the format a request brings is exactly the endpoint schema (in either spelling).
    Any shape is judged, none raises: a malformed format is simply not the endpoint schema."""
    ours = endpoint_json_schema()
    fmt = body.get("response_format")
    if fmt is not None:
        inner = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = inner.get("schema") if isinstance(inner, dict) else None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or schema != ours:
            return False
    so = body.get("structured_outputs")
    if so is not None:
        given = {k for k, v in so.items() if v is not None} if isinstance(so, dict) else None
        if given == {"grammar"}:  # this server's own compact grammar (serve/grammar.py)
            return bool(so["grammar"] == endpoint_grammar())
        if given != {"json"}:
            return False
        json_value = so["json"]
        if isinstance(json_value, str):
            try:
                json_value = json.loads(json_value)
            except ValueError:
                return False
        if json_value != ours:
            return False
    return True


def _kind(path: str, body: dict[str, Any]) -> str | None:
    """'chat', 'completions', or None for a request the policy does not constrain."""
    if path in CHAT_PATHS:
        return "chat"
    if path == COMPLETIONS_PATH:
        return "completions"
    if path == SAGEMAKER_PATH:
        return "chat" if "messages" in body else "completions" if "prompt" in body else None
    return None


def _check_format_shapes(body: dict[str, Any]) -> None:
    """Formats vLLM would answer with a 500 (or take apart in ways no one meant) get a 400 here."""
    fmt, so = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("type"), str)):
        raise PolicyError(
            400, 'response_format must be an object with a "type", such as "json_schema"', "response_format"
        )
    if (
        isinstance(fmt, dict)
        and fmt["type"] == "json_schema"
        and not isinstance(fmt.get("json_schema"), dict)
    ):
        raise PolicyError(
            400, 'response_format of type "json_schema" needs a "json_schema" object', "response_format"
        )
    if so is not None and not isinstance(so, dict):
        raise PolicyError(400, "structured_outputs must be an object", "structured_outputs")


def _whole(key: str, value: object) -> int | None:
    """A count as vLLM should get it: a JSON integer or null. vLLM's pydantic models would take
    1500.0, "1500" and true for 1500, 1500 and 1, past every check made here."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise PolicyError(400, f"{key} must be a whole number, not {json.dumps(value)[:40]}", key)


def _prompts(body: dict[str, Any]) -> int:
    """How many prompts a completions request holds: a string or a token list is one; a list of
    strings or of token lists is one each (prompt_embeds likewise)."""
    count = 0
    for key in ("prompt", "prompt_embeds"):
        value = body.get(key)
        if isinstance(value, list) and not all(isinstance(v, int) for v in value):
            count += len(value)
        elif value is not None:
            count += 1
    return max(count, 1)


def _check_text_only(path: str, messages: object) -> None:
    """Message content must be text. A media part (image_url, audio_url, video_url, file, ...) would
    have vLLM fetch a URL from inside the deployment's network, or decode a file, for an extractor
    that reads text only. Shapes other than these are left for vLLM to refuse with its own 400."""
    conversations = messages if path == "/v1/chat/completions/batch" else [messages]
    for conversation in conversations if isinstance(conversations, list) else ():
        for message in conversation if isinstance(conversation, list) else ():
            content = message.get("content") if isinstance(message, dict) else None
            for part in content if isinstance(content, list) else ():
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise PolicyError(
                        400,
                        f"message content of type {json.dumps(kind)} is not accepted: this server "
                        "extracts endpoints from text; send the text as a string or text parts",
                        "messages",
                    )


def _refusal(param: str, mode: str) -> PolicyError:
    why = (
        "this server's schema policy is 'force'"
        if mode == "force"
        else "the endpoint schema applies to this request (send a format of your own to use it)"
    )
    return PolicyError(
        400,
        f"'{param}' is not accepted with the endpoint schema: it could return text outside it ({why})",
        param,
    )


@dataclass(frozen=True)
class Policy:
    mode: str = "default"
    model: str = "endpoint-extractor"
    max_tokens_cap: int = 1024
    max_request_tokens: int = 4096
    max_body_bytes: int = 1_000_000
    body_timeout: float = 30.0
    # Send the endpoint schema as xgrammar's compact grammar (serve/grammar.py), so every vLLM
    # writes minimal JSON; the policy's decisions are the same either way.
    compact_grammar: bool = False

    @classmethod
    def from_env(cls) -> Policy:
        env = os.environ
        return cls(
            mode=env.get("ENDPOINT_SCHEMA_POLICY", "default"),
            model=env.get("ENDPOINT_SERVED_MODEL_NAME", "endpoint-extractor"),
            max_tokens_cap=int(env.get("ENDPOINT_MAX_TOKENS_CAP", "1024")),
            max_request_tokens=int(env.get("ENDPOINT_MAX_REQUEST_TOKENS", "4096")),
            max_body_bytes=int(env.get("ENDPOINT_MAX_BODY_BYTES", "1000000")),
            body_timeout=float(env.get("ENDPOINT_BODY_TIMEOUT", "30")),
            compact_grammar=compact_grammar_applies(env),
        )

    def route_open(self, path: str) -> bool:
        """Whether a POST to ``path`` may proceed at all under this policy."""
        if self.mode != "force":
            return True
        return path in (*GENERATION_PATHS, *NON_GENERATING_PATHS)

    def apply(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request as vLLM should see it, or a PolicyError."""
        return self.decide(path, body)[0]

    def decide(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The request as vLLM should see it and what the policy did (for the log)."""
        self._check_counts(path, body)
        kind = _kind(path, body)
        if self.mode != "off" and kind == "chat":
            _check_text_only(path, body.get("messages"))
        if self.mode == "off" or path in NON_GENERATING_PATHS or kind is None:
            if self.mode == "force" and path not in NON_GENERATING_PATHS:
                raise PolicyError(
                    400, "this server's schema policy is 'force': send a chat or completions request"
                )
            return body, "none"
        _check_format_shapes(body)
        if self.mode == "force":
            if _brings_format(body) and not _is_endpoint_format(body):
                param = "response_format" if body.get("response_format") is not None else "structured_outputs"
                raise PolicyError(
                    400,
                    f"'{param}' is not accepted: this server's schema policy is 'force', it returns "
                    "endpoint JSON only; drop response_format/structured_outputs or send the endpoint schema",
                    param,
                )
            action = "forced"
        elif _brings_format(body):
            if not _is_endpoint_format(body):
                return body, "kept"  # a format of the request's own: plain vLLM
            action = "kept"
        elif kind == "chat" and (body.get("model") or self.model) == self.model:
            action = "injected"
        else:
            return body, "none"
        self._check_params(kind, body)
        # Rebuilt even when kept, so vLLM parses exactly the body judged here.
        body = {k: v for k, v in body.items() if k not in FORMAT_KEYS}
        if self.compact_grammar:
            return {**body, "structured_outputs": grammar_structured_outputs()}, action
        if kind == "completions":
            return {**body, "structured_outputs": {"json": endpoint_json_schema()}}, action
        return {**body, "response_format": schema_response_format()}, action

    def _check_params(self, kind: str, body: dict[str, Any]) -> None:
        allowed = ALLOWED_PARAMS[kind]
        for key, value in body.items():
            if key in allowed or json.dumps(value) in NEUTRAL_VALUES.get(key, ()):
                continue
            if kind == "chat" and key == "prompt":
                # /invocations: vLLM would try it as a completion when chat validation fails.
                raise PolicyError(400, "send either messages or prompt, not both", key)
            raise _refusal(key, self.mode)

    def _check_counts(self, path: str, body: dict[str, Any]) -> None:
        """Whole numbers, each sequence under the cap, and the whole request within the budget."""
        sampling = body.get("sampling_params")  # /inference/v1/generate
        where = sampling if isinstance(sampling, dict) else body
        counts = {key: _whole(key, where.get(key)) for key in COUNT_KEYS}
        if where is not body:
            for key in COUNT_KEYS:
                _whole(key, body.get(key))
        for key in TOKEN_LIMIT_KEYS:
            value = counts[key]
            if value is not None and value > self.max_tokens_cap:
                raise PolicyError(
                    400, f"{key}={value} exceeds this server's cap of {self.max_tokens_cap}", key
                )
        # vLLM reads one of the spellings (which, depends on the route): count the largest. None
        # given, each sequence may run to the server's cap.
        limits = [v for k in TOKEN_LIMIT_KEYS if (v := counts[k]) is not None]
        per_sequence = max(limits, default=self.max_tokens_cap)
        sequences = max(counts["n"] or 1, counts["best_of"] or 1)
        prompts = 1
        if path in (COMPLETIONS_PATH, SAGEMAKER_PATH) and "messages" not in body:
            prompts = _prompts(body)
        elif path == "/v1/chat/completions/batch" and isinstance(body.get("messages"), list):
            prompts = max(len(body["messages"]), 1)
        total = prompts * sequences * per_sequence
        if total > self.max_request_tokens:
            raise PolicyError(
                400,
                f"this request may generate {prompts} prompt(s) x n={sequences} x {per_sequence} tokens "
                f"= {total} tokens, over this server's per-request budget of {self.max_request_tokens}; "
                "lower n, max_tokens or the number of prompts",
                "n" if sequences > 1 else "prompt" if prompts > 1 else "max_tokens",
            )

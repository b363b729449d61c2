"""The schema policy as pure logic (the e2e and serve tests drive it through a real server)."""

from __future__ import annotations

import pytest

from client import endpoint_json_schema
from serve.middleware import Policy, PolicyError, schema_response_format

CHAT = "/v1/chat/completions"
BODY = {"model": "endpoint-extractor", "messages": [{"role": "user", "content": "x"}]}


def test_default_injects_when_no_format() -> None:
    out = Policy("default").apply(CHAT, dict(BODY))
    assert out["response_format"] == schema_response_format()


def test_default_leaves_own_format_alone() -> None:
    own = {**BODY, "response_format": {"type": "json_object"}}
    assert Policy("default").apply(CHAT, own) == own
    so = {**BODY, "structured_outputs": {"regex": "a+"}}
    assert Policy("default").apply(CHAT, so) == so


def test_other_models_and_off_untouched() -> None:
    other = {**BODY, "model": "another"}
    assert Policy("default").apply(CHAT, other) == other
    assert Policy("off").apply(CHAT, dict(BODY)) == BODY


def test_force_rejects_other_formats_and_accepts_ours() -> None:
    with pytest.raises(PolicyError) as err:
        Policy("force").apply(CHAT, {**BODY, "response_format": {"type": "text"}})
    assert err.value.status == 400 and "force" in err.value.message
    ours = {**BODY, "structured_outputs": {"json": endpoint_json_schema()}}
    out = Policy("force").apply(CHAT, ours)
    assert out["response_format"] == schema_response_format() and "structured_outputs" not in out


def test_force_constrains_plain_completions() -> None:
    out = Policy("force").apply("/v1/completions", {"model": "endpoint-extractor", "prompt": "x"})
    assert out["structured_outputs"] == {"json": endpoint_json_schema()}


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_cap(key: str) -> None:
    with pytest.raises(PolicyError) as err:
        Policy(max_tokens_cap=100).apply(CHAT, {**BODY, key: 101})
    assert err.value.status == 400 and "cap of 100" in err.value.message
    assert Policy(max_tokens_cap=100).apply(CHAT, {**BODY, key: 100})[key] == 100

"""The schema policy as pure logic (the e2e and serve tests drive it through a real server)."""

from __future__ import annotations

import pytest

from client import endpoint_json_schema
from serve.middleware import Policy, PolicyError, _json_body, schema_response_format

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


def test_boolean_max_tokens_is_refused() -> None:
    with pytest.raises(PolicyError) as err:
        Policy().apply(CHAT, {**BODY, "max_tokens": True})
    assert err.value.status == 400 and err.value.message == "max_tokens must be a whole number, not true"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"model": ', "request body is not valid JSON: Expecting value at line 1 column 11"),
        (b"", "request body is not valid JSON: Expecting value at line 1 column 1"),
        (b"[1, 2]", "request body must be a JSON object, not an array"),
        (b'"hello"', "request body must be a JSON object, not a string"),
        (b'{"a": "\xff"}', "request body is not valid UTF-8 (byte 7)"),
        (b'{"a": "\xed\xa0\x80"}', "request body is not valid UTF-8 (byte 7)"),  # an encoded surrogate
        (b'{"a": "\\ud800"}', "request body holds a lone surrogate ('\\ud800'); send valid Unicode"),
    ],
)
def test_bodies_a_generation_request_cannot_have(raw: bytes, problem: str) -> None:
    assert _json_body(raw) == (None, problem)


def test_valid_bodies_pass_whole() -> None:
    assert _json_body('{"a": "\\ud83d\\ude00 \u00e9 \u4e2d"}'.encode()) == ({"a": "\U0001f600 é 中"}, None)

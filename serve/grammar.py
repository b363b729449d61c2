"""Compact endpoint JSON on every vLLM: the endpoint schema as an xgrammar grammar with minimal
separators, sent as a structured-output grammar instead of the JSON schema.

vLLM compiles a JSON schema itself, and its separators depend on the release: 0.23 passes none, so
xgrammar writes ``{"a": 1, "b": 2}`` (136.9 tokens per extraction on the stand-in), while 0.32 passes
``(",", ":")`` (111.5). A grammar is compiled as given (``structured_outputs: {"grammar": ...}``,
``StructuredOutputOptions.GRAMMAR`` -> ``compiler.compile_grammar`` in both releases), so building it
here with ``separators=(",", ":")`` and no free whitespace gives the minimal form on all of them.
xgrammar is what vLLM's default backend runs; the grammar is xgrammar's EBNF, so it applies only
when the server's backend is xgrammar.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

from client.models import endpoint_json_schema

SEPARATORS = (",", ":")
# Set by serve/launcher.py's server_env for the server process.
BACKEND_ENV = "ENDPOINT_STRUCTURED_BACKEND"
ANY_WHITESPACE_ENV = "ENDPOINT_ANY_WHITESPACE"


@functools.lru_cache(maxsize=1)
def endpoint_grammar() -> str:
    """xgrammar EBNF for exactly the endpoint schema, written without whitespace."""
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(
        json.dumps(endpoint_json_schema()), any_whitespace=False, separators=SEPARATORS, strict_mode=True
    )
    return str(grammar)


def grammar_structured_outputs() -> dict[str, Any]:
    """The request-body value of ``structured_outputs`` that constrains an answer to compact
    endpoint JSON (chat and completions alike; no ``response_format`` alongside it)."""
    return {"grammar": endpoint_grammar()}


def compact_grammar_applies(env: Mapping[str, str] | None = None) -> bool:
    """Whether this server should send the grammar in place of the endpoint schema: its backend
    is xgrammar (another backend cannot read xgrammar's EBNF; ``auto`` may pick another one) and
    free whitespace was not asked for (--any-whitespace)."""
    env = os.environ if env is None else env
    return env.get(BACKEND_ENV, "xgrammar") == "xgrammar" and env.get(ANY_WHITESPACE_ENV, "0") != "1"

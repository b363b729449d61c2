"""Other people's clients against the real server, with the pydantic model as the only schema:
the OpenAI SDK's parse (sync in test_e2e.py, async here) and outlines (its OpenAI and vLLM
adapters). Each must come back as a validated EndpointExtraction."""

from __future__ import annotations

import asyncio
from typing import Any

import outlines
import pytest
from openai import AsyncOpenAI, OpenAI
from outlines.inputs import Chat

from client import EndpointExtraction, build_messages

pytestmark = pytest.mark.e2e
TEXT = "Overall survival (OS) in the intention-to-treat population | [Time Frame: up to 5 years]"


def test_async_openai_sdk_parse(server: Any) -> None:
    async def parse() -> Any:
        async with AsyncOpenAI(base_url=server.base_url, api_key="unused") as sdk:
            return await sdk.chat.completions.parse(
                model="endpoint-extractor",
                messages=build_messages(TEXT),  # type: ignore[arg-type]
                response_format=EndpointExtraction,
                max_tokens=512,
            )

    reply = asyncio.run(parse())
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(reply.choices[0].message.parsed, EndpointExtraction)


@pytest.mark.parametrize("adapter", [outlines.from_openai, outlines.from_vllm])
def test_outlines_with_the_pydantic_model(server: Any, adapter: Any) -> None:
    model = adapter(OpenAI(base_url=server.base_url, api_key="unused"), "endpoint-extractor")
    raw = model(Chat(build_messages(TEXT)), EndpointExtraction, max_tokens=512)
    extraction = EndpointExtraction.model_validate_json(raw)
    assert extraction.endpoints

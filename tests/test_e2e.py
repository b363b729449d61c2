"""End to end on a real vLLM CPU server: demo build -> merge -> serve -> client -> schema-valid JSON."""

from __future__ import annotations

import http.client
import json
import time

import httpx
import pytest
import torch
from openai import OpenAI

from client import EndpointClient, EndpointExtraction, InvalidInputError, build_messages
from serve.demo_model import DemoPaths
from tests.peft_oracle import last_token_logprobs, load_base, peft_model

pytestmark = pytest.mark.e2e
TEXT = "Progression-Free Survival (PFS) assessed by RECIST v1.1 using CT scan at 24 weeks"


def test_client_extract_returns_validated_extraction(server, demo: DemoPaths) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    card_prompt = tokenizer.apply_chat_template(
        build_messages(TEXT), tokenize=True, add_generation_prompt=True
    )
    sdk = OpenAI(base_url=server.base_url, api_key="unused")
    direct = sdk.chat.completions.create(
        model="endpoint-extractor", messages=build_messages(TEXT), max_tokens=512
    )
    with EndpointClient(server.base_url) as client:
        result = client.extract(TEXT)
        assert isinstance(result, EndpointExtraction) and result.endpoints
        # The server saw exactly the model card's prompt, and greedy decoding gave the same answer.
        assert client.usage.requests == 1 and client.usage.prompt_tokens == len(card_prompt["input_ids"])
        assert result == EndpointExtraction.model_validate_json(direct.choices[0].message.content or "")
        with pytest.raises(InvalidInputError):
            client.extract("   ")


def test_plain_openai_sdk_without_response_format_gets_schema_valid_json(server) -> None:
    sdk = OpenAI(base_url=server.base_url, api_key="unused")
    for text in (TEXT, "Body height", "Overall survival | [Time Frame: up to 5 years]"):
        reply = sdk.chat.completions.create(
            model="endpoint-extractor", messages=build_messages(text), max_tokens=512
        )
        assert reply.choices[0].finish_reason == "stop"
        EndpointExtraction.model_validate_json(reply.choices[0].message.content or "")


def test_openai_sdk_parse_with_the_pydantic_model(server) -> None:
    sdk = OpenAI(base_url=server.base_url, api_key="unused")
    reply = sdk.chat.completions.parse(
        model="endpoint-extractor",
        messages=build_messages(TEXT),
        response_format=EndpointExtraction,
        max_tokens=512,
    )
    assert isinstance(reply.choices[0].message.parsed, EndpointExtraction)


def test_served_model_computes_what_the_unmerged_adapter_computes(server, demo: DemoPaths) -> None:
    """vLLM's logprobs on the merged model vs transformers + PEFT with the adapter unmerged: a
    merge that drops, misplaces or mis-scales the LoRA fails here."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    prompt = tokenizer.apply_chat_template(build_messages(TEXT), tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    sdk = OpenAI(base_url=server.base_url, api_key="unused")
    reply = sdk.completions.create(
        model="endpoint-extractor", prompt=ids, max_tokens=1, logprobs=5, temperature=0
    )
    served = reply.choices[0].logprobs.top_logprobs[0]

    expected = last_token_logprobs(peft_model(demo.base, demo.adapter), ids)
    without_adapter = last_token_logprobs(load_base(demo.base), ids)
    vocab = {tokenizer.decode([i]): i for i in expected.topk(20).indices.tolist()}
    diffs_merged, diffs_base = [], []
    for token, logprob in served.items():
        token_id = vocab.get(token)
        assert token_id is not None, f"served top token {token!r} is not in the reference top 20"
        diffs_merged.append(abs(logprob - float(expected[token_id])))
        diffs_base.append(abs(logprob - float(without_adapter[token_id])))
    assert max(diffs_merged) < 2e-3, diffs_merged
    assert max(diffs_base) > 2e-2, "the adapter should visibly change these logprobs"


def test_server_injects_schema_into_raw_http_requests(server) -> None:
    import httpx

    body = {"model": "endpoint-extractor", "messages": build_messages("Body height"), "max_tokens": 512}
    reply = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120).json()
    EndpointExtraction.model_validate(json.loads(reply["choices"][0]["message"]["content"]))
    assert torch.__version__  # the CPU build of torch is what serves here


def test_an_idle_connection_outlives_a_clients_pause(server) -> None:
    # With uvicorn's 5 s default, a request sent on a connection idle that long meets the server
    # closing it: a reset, status 0, lost (nothing retries a POST). Clients (httpx: 5 s) and
    # balancers must be the ones to drop idle connections first.
    url = httpx.URL(server.root_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        for pause in (0.0, 6.0):
            time.sleep(pause)
            connection.request("GET", "/v1/models")
            response = connection.getresponse()
            assert response.status == 200 and b"endpoint-extractor" in response.read()
            assert response.getheader("connection", "").lower() != "close"
    finally:
        connection.close()

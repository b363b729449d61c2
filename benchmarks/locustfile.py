"""Locust load test for the endpoint extractor's OpenAI-compatible chat endpoint.

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless \
        -u 64 -r 8 -t 2m --csv results/load --html results/load.html [--stream]

Each simulated user sends the model card's extraction prompt for a text drawn from the corpus
(benchmarks/data/corpus.jsonl) and validates the answer against the endpoint schema
(client.models.EndpointExtraction): an answer that is not a valid extraction counts as a failure,
like an HTTP error. With ``--stream``, time to first token (``TTFT``) and the gap between
consecutive streamed chunks (``ITL``) are reported as their own request types, so locust's tables,
CSV and HTML cover them with percentiles. The run exits non-zero when the failure ratio exceeds
``--max-fail-ratio`` (default 0: any failure fails the run).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.workload import CORPUS, load  # noqa: E402
from client.models import EndpointExtraction, endpoint_json_schema  # noqa: E402
from client.prompt import build_messages  # noqa: E402

CHAT_PATH = "/v1/chat/completions"


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # type: ignore[no-untyped-def]
    group = parser.add_argument_group("endpoint extractor")
    group.add_argument("--model", default="endpoint-extractor", help="served model name")
    group.add_argument("--api-key", default="unused", env_var="ENDPOINT_API_KEY", help="bearer token")
    group.add_argument("--max-tokens", type=int, default=512, help="max_tokens per request")
    group.add_argument("--stream", action="store_true", default=False, help="stream; report TTFT and ITL")
    group.add_argument(
        "--send-schema",
        action="store_true",
        default=False,
        help="send the endpoint schema as response_format (for servers without the schema policy)",
    )
    group.add_argument("--texts", default=str(CORPUS), help="JSONL file of {id, text}")
    group.add_argument("--max-fail-ratio", type=float, default=0.0, help="exit 1 above this failure ratio")


@events.quitting.add_listener
def _gate(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    limit = environment.parsed_options.max_fail_ratio
    total = environment.stats.total
    if total.num_requests == 0 or total.fail_ratio > limit:
        print(
            f"locustfile: failure ratio {total.fail_ratio:.4f} over {total.num_requests} requests "
            f"(limit {limit})",
            file=sys.stderr,
        )
        environment.process_exit_code = 1


_TEXTS: list[str] = []


@events.init.add_listener
def _load_texts(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    options = environment.parsed_options
    if options is not None:
        _TEXTS[:] = [item.text for item in load(Path(options.texts))]


class ExtractionUser(HttpUser):
    wait_time = between(0, 0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.client.headers["Authorization"] = f"Bearer {options.api_key}"
        self.rng = random.Random()

    def _body(self, text: str) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self.options.model,
            "messages": build_messages(text),
            "max_tokens": self.options.max_tokens,
        }
        if self.options.send_schema:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "EndpointExtraction", "schema": endpoint_json_schema()},
            }
        if self.options.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def extract(self) -> None:
        text = self.rng.choice(_TEXTS)
        if self.options.stream:
            self._streamed(text)
        else:
            self._blocking(text)

    def _blocking(self, text: str) -> None:
        with self.client.post(
            CHAT_PATH, json=self._body(text), name="extract", catch_response=True
        ) as response:
            if response.status_code != 200:
                # Status 0: no answer came back; the exception says why (reset, closed, ...).
                why = (
                    response.text[:200]
                    if response.status_code
                    else repr(getattr(response, "error", None))[:200]
                )
                response.failure(f"HTTP {response.status_code}: {why}")
                return
            try:
                content = response.json()["choices"][0]["message"]["content"] or ""
                EndpointExtraction.model_validate_json(content)
            except (ValueError, KeyError, IndexError) as exc:
                response.failure(f"not a valid extraction: {str(exc).splitlines()[0][:200]}")

    def _fire(self, kind: str, ms: float, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name="extract (stream)",
            response_time=ms,
            response_length=length,
            exception=None,
        )

    def _streamed(self, text: str) -> None:
        start = time.perf_counter()
        parts: list[str] = []
        last: float | None = None
        with self.client.post(
            CHAT_PATH, json=self._body(text), name="extract (stream)", stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                # Status 0: no answer came back; the exception says why (reset, closed, ...).
                why = (
                    response.text[:200]
                    if response.status_code
                    else repr(getattr(response, "error", None))[:200]
                )
                response.failure(f"HTTP {response.status_code}: {why}")
                return
            try:
                for raw in response.iter_lines():
                    line = raw.decode() if isinstance(raw, bytes) else raw
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", ()):
                        delta = (choice.get("delta") or {}).get("content")
                        if not delta:
                            continue
                        now = time.perf_counter()
                        if last is None:
                            self._fire("TTFT", (now - start) * 1000)
                        else:
                            self._fire("ITL", (now - last) * 1000)
                        last = now
                        parts.append(delta)
                content = "".join(parts)
                self._fire("E2E", (time.perf_counter() - start) * 1000, len(content))
                EndpointExtraction.model_validate_json(content)
            except (ValueError, KeyError) as exc:
                response.failure(f"not a valid extraction: {str(exc).splitlines()[0][:200]}")

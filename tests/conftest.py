from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.demo_model import DemoPaths, build_demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """The tiny base + adapter, built once per test session."""
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_dir(demo: DemoPaths) -> Path:
    return demo.base.parent


@pytest.fixture(scope="session")
def server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real vLLM CPU server on the merged demo model, shared by the e2e tests."""
    from serve.launcher import ServerProcess
    from serve.settings import ServeSettings

    # A short body timeout, so the bad-input catalogue's stalled client is answered soon.
    settings = ServeSettings(demo=True, demo_dir=demo_dir, port=free_port(), body_timeout=10)
    log = tmp_path_factory.mktemp("logs") / "vllm.log"
    with ServerProcess(settings, log_path=log) as proc:
        yield proc

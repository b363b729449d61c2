"""python -m serve --model DIR | --demo [--extract TEXT] [vLLM arguments ...]"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from serve.launcher import (
    VLLM_SERVER_MODULE,
    LaunchError,
    ServerProcess,
    check_port_free,
    prepare_model,
    server_env,
    vllm_argv,
)
from serve.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    settings, passthrough = parse_settings(sys.argv[1:] if argv is None else argv)
    print(f"serve: settings {json.dumps(settings.masked())}", file=sys.stderr, flush=True)
    try:
        if settings.extract is not None:
            return _extract_once(settings, passthrough)
        check_port_free(settings.host, settings.port)
        model = prepare_model(settings)
    except LaunchError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    argv_vllm = [sys.executable, "-m", VLLM_SERVER_MODULE, *vllm_argv(settings, model, passthrough)]
    # Replace this process with vLLM's server: signals (SIGTERM drains) and exit codes are its own.
    os.execvpe(sys.executable, argv_vllm, server_env(settings))
    return 0  # not reached


def _extract_once(settings, passthrough: list[str]) -> int:  # type: ignore[no-untyped-def]
    from client import EndpointClient, EndpointError

    log = Path(tempfile.gettempdir()) / f"endpoint-serve-{settings.port}.log"
    print(f"serve: starting vLLM (log: {log}) ...", file=sys.stderr, flush=True)
    with ServerProcess(settings, passthrough, log_path=log) as server:
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        with EndpointClient(server.base_url, api_key=api_key, model=settings.served_model_name) as client:
            try:
                extraction = client.extract(settings.extract or "")
            except EndpointError as exc:
                print(f"serve: error: {exc}", file=sys.stderr)
                return 1
    print(extraction.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

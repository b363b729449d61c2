"""python -m serve --model DIR | --demo [--engines N|auto] [--extract TEXT] [vLLM arguments ...]"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from serve.balancer import BalancerMissing, caddy_binary
from serve.engines import plan_group, run_group, run_one
from serve.launcher import (
    LaunchError,
    ServerProcess,
    check_kv_cache_fits,
    check_passthrough,
    check_port_free,
    on_cpu,
    prepare_model,
    server_env,
)
from serve.settings import ServeSettings, parse_settings


def main(argv: list[str] | None = None) -> int:
    settings, passthrough = parse_settings(sys.argv[1:] if argv is None else argv)
    print(f"serve: settings {json.dumps(settings.masked())}", file=sys.stderr, flush=True)
    try:
        if settings.extract is not None:
            return _extract_once(settings, passthrough)
        check_passthrough(passthrough, settings)
        check_port_free(settings.host, settings.port)
        if isinstance(settings.engines, int) and settings.engines > 1:
            caddy_binary()  # before a long model build, not after
        model = prepare_model(settings)
        env = server_env(settings)
        group = None
        if settings.engines != 1:
            group = plan_group(settings, model, passthrough, env)
        if group is None and on_cpu():
            check_kv_cache_fits(env)
    except (LaunchError, BalancerMissing) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    env["ENDPOINT_DRAIN_FLAG"] = drain_flag = os.path.join(
        tempfile.gettempdir(), f"endpoint-serve-{os.getpid()}.draining"
    )
    if group is not None:
        try:
            return run_group(settings, group, env, Path(drain_flag))
        except LaunchError as exc:
            print(f"serve: error: {exc}", file=sys.stderr)
            return 1
    return run_one(settings, model, passthrough, env, Path(drain_flag))


def _extract_once(settings: ServeSettings, passthrough: list[str]) -> int:
    from client import EndpointClient, EndpointError

    log = Path(tempfile.gettempdir()) / f"endpoint-serve-{settings.port}.log"
    print(f"serve: starting vLLM (log: {log}) ...", file=sys.stderr, flush=True)
    server_settings = settings.model_copy(update={"extract": None})
    with ServerProcess(server_settings, passthrough, log_path=log) as server:
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

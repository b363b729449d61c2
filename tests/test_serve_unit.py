"""serve/ without a running server: settings, vLLM's argv as vLLM itself parses it, the schema
policy's routes, and the start-up root-cause summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client import endpoint_json_schema
from serve.launcher import LaunchError, check_passthrough, server_env, settings_argv, vllm_argv
from serve.middleware import Policy, PolicyError, schema_response_format
from serve.settings import ServeSettings, parse_settings
from serve.supervisor import root_cause

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("variable", ["ENDPOINT_API_KEY", "VLLM_API_KEY"])
def test_api_key_from_the_environment_is_masked(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "s3cret")
    settings, _ = parse_settings(["--demo", "--host", "0.0.0.0"])
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert settings.masked()["api_key"] == "***" and "s3cret" not in str(settings.masked())


def test_beyond_loopback_needs_a_key_or_an_explicit_opt_out() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--demo", "--host", "0.0.0.0"])
    assert str(exc.value).startswith("serve: error: refusing to bind 0.0.0.0")
    settings, _ = parse_settings(["--demo", "--host", "0.0.0.0", "--allow-unauthenticated"])
    assert settings.allow_unauthenticated
    for host in ("127.0.0.1", "localhost", "::1"):
        assert parse_settings(["--demo", "--host", host])[0].host == host


def test_unknown_arguments_pass_through_and_are_never_abbreviations_of_ours() -> None:
    settings, passthrough = parse_settings(["--demo", "--max-num-seqs", "8", "--port", "9000", "--max", "1"])
    assert settings.port == 9000 and passthrough == ["--max-num-seqs", "8", "--max", "1"]


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--demo", "--cpu-kvcache-gib", "0"])
    assert str(exc.value).startswith("serve: error: --cpu-kvcache-gib: ")


def test_settings_argv_recreates_the_settings_without_the_key(tmp_path: Path) -> None:
    settings = ServeSettings(
        demo=True, demo_dir=tmp_path, port=1234, schema_policy="force", api_key="k", log_format="json"
    )
    argv = settings_argv(settings)
    assert "k" not in argv
    again, passthrough = parse_settings(argv)
    assert passthrough == [] and again.model_dump(exclude={"api_key"}) == settings.model_dump(
        exclude={"api_key"}
    )


def test_vllm_accepts_our_argv_and_configures_what_we_mean(tmp_path: Path) -> None:
    """Parsed by vLLM's own argument parser, so a renamed or reshaped vLLM flag fails here."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = ServeSettings(model=str(tmp_path), max_tokens_cap=300, shutdown_timeout=7, log_format="json")
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        vllm_argv(settings, str(tmp_path), ["--max-num-seqs", "8"])
    )
    engine = AsyncEngineArgs.from_cli_args(args)
    assert engine.enable_prefix_caching and engine.shutdown_timeout == 7 and engine.max_num_seqs == 8
    assert engine.served_model_name == ["endpoint-extractor"] and engine.max_model_len == 2048
    assert engine.structured_outputs_config.backend == "xgrammar"
    assert engine.structured_outputs_config.disable_any_whitespace
    assert engine.override_generation_config == {"temperature": 0.0, "max_new_tokens": 300}
    assert args.default_chat_template_kwargs == {"enable_thinking": False}
    assert args.middleware == ["serve.middleware.SchemaPolicyMiddleware"]
    assert args.enable_request_id_headers


def test_json_log_config_writes_one_json_object_per_record(tmp_path: Path) -> None:
    env = server_env(ServeSettings(model=str(tmp_path), log_format="json"))
    program = (
        "import json, logging.config, os\n"
        "logging.config.dictConfig(json.load(open(os.environ['VLLM_LOGGING_CONFIG_PATH'])))\n"
        "logging.getLogger('vllm.endpoint_extractor.access').info('hello', extra={'request_id': 'r1'})\n"
        "logging.getLogger('uvicorn.access').info('GET /health')\n"
    )
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["name"], r["message"]) for r in records] == [
        ("vllm.endpoint_extractor.access", "hello"),
        ("uvicorn.access", "GET /health"),
    ]
    assert records[0]["request_id"] == "r1" and records[0]["levelname"] == "INFO"


def test_force_constrains_every_model_name_and_refuses_tools() -> None:
    out = Policy("force").apply(CHAT, {"model": "another", "messages": MESSAGES})
    assert out["response_format"] == schema_response_format()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(PolicyError) as err:
        Policy("force").apply(CHAT, {"messages": MESSAGES, "tools": tools})
    assert err.value.status == 400 and err.value.param == "tools"


def test_force_opens_only_constrained_and_non_generating_routes() -> None:
    force, default = Policy("force"), Policy("default")
    for path in ("/v1/responses", "/v1/messages", "/inference/v1/generate", "/v1/systemone", "/v1/x"):
        assert not force.route_open(path) and default.route_open(path)
    for path in (CHAT, "/v1/chat/completions/batch", "/v1/completions", "/invocations", "/tokenize"):
        assert force.route_open(path)


def test_batch_and_sagemaker_chat_get_the_chat_policy() -> None:
    batch = Policy("default").apply("/v1/chat/completions/batch", {"messages": [MESSAGES, MESSAGES]})
    assert batch["response_format"] == schema_response_format()
    chat = Policy("default").apply("/invocations", {"messages": MESSAGES})
    assert chat["response_format"] == schema_response_format()
    completion = Policy("force").apply("/invocations", {"prompt": "x"})
    assert completion["structured_outputs"] == {"json": endpoint_json_schema()}


def test_token_cap_covers_every_spelling_and_every_route() -> None:
    policy = Policy("off", max_tokens_cap=10)
    for path, over, at_cap in (
        ("/v1/responses", {"max_output_tokens": 11}, {"max_output_tokens": 10}),
        (
            "/inference/v1/generate",
            {"sampling_params": {"max_tokens": 11}},
            {"sampling_params": {"max_tokens": 10}},
        ),
        ("/v1/messages", {"max_tokens": 11}, {"max_tokens": 10}),
    ):
        with pytest.raises(PolicyError) as err:
            policy.apply(path, over)
        assert err.value.status == 400 and "cap of 10" in err.value.message
        assert policy.apply(path, at_cap) == at_cap


def test_decide_reports_what_it_did() -> None:
    assert Policy("default").decide(CHAT, {"messages": MESSAGES})[1] == "injected"
    own = {"messages": MESSAGES, "response_format": {"type": "json_object"}}
    assert Policy("default").decide(CHAT, own)[1] == "kept"
    assert Policy("force").decide(CHAT, {"messages": MESSAGES})[1] == "forced"
    assert Policy("off").decide(CHAT, {"messages": MESSAGES})[1] == "none"


# The shape of a real vLLM 0.32 start-up failure (VLLM_CPU_KVCACHE_SPACE=10000): the worker's error
# comes first, then the engine core and the API server re-raise it wrapped.
KV_FAILURE_LOG = """\
(APIServer pid=10302) WARNING 11-25 08:57:04 [system_utils.py:255] Found ulimit of 20000 and failed to automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.
(Worker pid=10651) ERROR 11-25 08:59:04 [multiproc_executor.py:1063] Traceback (most recent call last):
(Worker pid=10651) ERROR 11-25 08:59:04 [multiproc_executor.py:1063]   File "/vllm/v1/worker/cpu_worker.py", line 221, in determine_available_memory
(Worker pid=10651) ERROR 11-25 08:59:04 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=10651) ERROR 11-25 08:59:04 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (6.49/10.09 GiB) on kv cache allocation is less than requested memory for kv (10000.0 GiB).
(EngineCore pid=10552) ERROR 11-25 08:59:04 [core.py:1510] RuntimeError: Worker failed with error 'Available memory on node 0', please check the stack trace above for the root cause
Traceback (most recent call last):
  File "/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""

PYDANTIC_FAILURE_LOG = """\
Traceback (most recent call last):
  File "/vllm/engine/arg_utils.py", line 2004, in create_engine_config
pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig
gpu_memory_utilization
  Input should be less than or equal to 1 [type=less_than_equal, input_value=1.5, input_type=float]
    For further information visit https://errors.pydantic.dev/2.14/v/less_than_equal
"""


def test_root_cause_is_the_first_exception_with_its_detail() -> None:
    assert root_cause(KV_FAILURE_LOG.splitlines()).startswith(
        "ValueError: Available memory on node 0 (6.49/10.09 GiB)"
    )
    assert root_cause(PYDANTIC_FAILURE_LOG.splitlines()) == (
        "ValidationError: 1 validation error for CacheConfig gpu_memory_utilization Input should be "
        "less than or equal to 1 [type=less_than_equal, input_value=1.5, input_type=float]"
    )
    assert root_cause(["starting", "Killed", ""]) == "Killed"
    assert len(root_cause(["ValueError: " + "x" * 1000])) == 400


def test_root_cause_reads_json_log_records() -> None:
    record = {
        "levelname": "ERROR",
        "message": "AsyncLLM output_handler failed.",
        "exc_info": 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
    }
    lines = ['{"levelname": "INFO", "message": "ready"}', json.dumps(record), "warnings.warn('x')"]
    assert root_cause(lines) == "EngineDeadError: EngineCore encountered an issue."


DATA_PARALLEL = [
    "--data-parallel-size", "4", "-dpl", "2", "--data-parallel-address=10.0.0.1",
    "--data-parallel-rpc-port", "13345", "--data-parallel-start-rank", "0", "-dpb", "mp",
]  # fmt: skip


def test_data_parallel_flags_reach_vllm_unchanged(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings, passthrough = parse_settings(["--model", str(tmp_path), *DATA_PARALLEL, "--port", "9000"])
    assert passthrough == DATA_PARALLEL and settings.port == 9000
    check_passthrough(passthrough, settings)
    argv = vllm_argv(settings, str(tmp_path), passthrough)
    engine = AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(argv))
    assert (engine.data_parallel_size, engine.data_parallel_size_local) == (4, 2)
    assert (engine.data_parallel_address, engine.data_parallel_rpc_port) == ("10.0.0.1", 13345)
    assert (engine.data_parallel_start_rank, engine.data_parallel_backend) == (0, "mp")
    short = vllm_argv(settings, str(tmp_path), parse_settings(["--model", str(tmp_path), "-dp", "2"])[1])
    assert (
        AsyncEngineArgs.from_cli_args(
            make_arg_parser(FlexibleArgumentParser()).parse_args(short)
        ).data_parallel_size
        == 2
    )


@pytest.mark.parametrize("flag", [["--headless"], ["--api-server-count", "2"], ["-asc=2"]])
def test_vllm_serve_only_flags_are_refused_not_ignored(flag: list[str]) -> None:
    with pytest.raises(LaunchError, match=r"is a `vllm serve` option"):
        check_passthrough(["-dp", "2", *flag], ServeSettings(demo=True))


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--api-key", ""], {}),
        (["--api-key", "   "], {}),
        (["--api-key", "a key"], {}),
        ([], {"ENDPOINT_API_KEY": ""}),
        ([], {"VLLM_API_KEY": ""}),
        ([], {"VLLM_API_KEY": " \t"}),
        ([], {"ENDPOINT_API_KEY": "\n"}),
    ],
)
def test_an_empty_or_blank_key_is_a_one_line_start_up_error(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str]
) -> None:
    """vLLM reads an empty key as no key: auth would be off on 0.0.0.0 (issue 12, item 3)."""
    for name in ("ENDPOINT_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--demo", "--host", "0.0.0.0", *argv])
    message = str(exc.value)
    assert message.startswith("serve: error: --api-key: ") and "\n" not in message
    assert "empty" in message or "whitespace" in message


def test_an_empty_key_exits_non_zero_from_the_command_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ENDPOINT_API_KEY", "VLLM_API_KEY")}
    proc = subprocess.run(
        [sys.executable, "-m", "serve", "--demo", "--demo-dir", str(tmp_path), "--host", "0.0.0.0", "--api-key", ""],
        capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("serve: error: --api-key: ")


def test_the_middleware_refuses_an_empty_key_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.middleware import SchemaPolicyMiddleware

    monkeypatch.setenv("VLLM_API_KEY", " ")
    with pytest.raises(RuntimeError, match="empty"):
        SchemaPolicyMiddleware(lambda scope, receive, send: None)  # type: ignore[arg-type,return-value]


def test_request_budget_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = parse_settings(["--demo", "--max-request-tokens", "2048"])
    assert settings.max_request_tokens == 2048
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--demo", "--max-tokens-cap", "1024", "--max-request-tokens", "512"])
    assert str(exc.value).startswith("serve: error: ") and "--max-request-tokens" in str(exc.value)
    monkeypatch.setenv("ENDPOINT_MAX_REQUEST_TOKENS", "3000")
    assert Policy.from_env().max_request_tokens == 3000


def test_the_request_budget_reaches_the_server() -> None:
    settings, _ = parse_settings(["--demo", "--max-request-tokens", "2048"])
    assert server_env(settings).get("ENDPOINT_MAX_REQUEST_TOKENS") == "2048"


def test_idle_connections_are_kept_longer_than_a_balancer_keeps_them() -> None:
    settings, _ = parse_settings(["--demo"])
    assert server_env(settings)["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "75"
    settings, _ = parse_settings(["--demo", "--keep-alive", "620"])
    assert server_env(settings)["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "620"
    for bad in ("0", "1.5", "x", "86401", "10000000000000000"):
        with pytest.raises(SystemExit) as exc:
            parse_settings(["--demo", "--keep-alive", bad])
        assert str(exc.value).startswith("serve: error: ") and "--keep-alive" in str(exc.value)


# -- the lifecycle (serve/supervisor.py's EngineGroup), with stand-in processes -------------------

# Stands in for an engine (or the balancer) only to drive the supervisor's rules. Each start follows
# the next step of its plan: "fail:C" exits C before serving; "die:C" answers /health once, then
# exits C; "serve" answers /health (503 once the drain flag exists) and, on SIGTERM, writes whether
# the flag existed and exits 0.
STAND_IN = """
import http.server, os, signal, sys, threading, time
from pathlib import Path
port, plan, record = int(sys.argv[1]), sys.argv[2].split(","), Path(sys.argv[3])
with record.open("a") as f:
    f.write("start\\n")
starts = record.read_text().count("start")
step, _, code = plan[min(starts, len(plan)) - 1].partition(":")
flag = Path(os.environ["ENDPOINT_DRAIN_FLAG"])
if step == "fail":
    print("ValueError: no such model", file=sys.stderr, flush=True)
    sys.exit(int(code))

def on_term(*_):
    with record.open("a") as f:
        f.write(f"drained={flag.exists()}\\n")
    os._exit(0)

def die():
    time.sleep(0.3)
    print("RuntimeError: engine core died", file=sys.stderr, flush=True)
    os._exit(int(code))

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if flag.exists() else 200)
        self.end_headers()
        if step == "die":
            threading.Thread(target=die).start()

    def log_message(self, *args):
        pass

signal.signal(signal.SIGTERM, on_term)
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""

DRIVER = """
import json, sys
from pathlib import Path
from serve.supervisor import Child, EngineGroup
stand_in, plans, records, ports, flag = json.loads(sys.argv[1])
def child(name, port, plan, record):
    env = {"ENDPOINT_DRAIN_FLAG": flag, "PATH": ""}
    return Child(name, [sys.executable, stand_in, str(port), plan, record], env)
root = f"http://127.0.0.1:{ports[-1]}"
several = len(plans) > 1
engines = [child(f"engine {i}" if several else "vLLM", ports[i], p, records[i]) for i, p in enumerate(plans)]
balancer = child("the balancer", ports[-1], "serve", records[-1]) if several else None
urls = [f"http://127.0.0.1:{port}/health" for port in ports[: len(plans)]]
group = EngineGroup(engines, urls, balancer, health_url=root + "/health", base_url=root + "/v1",
                    startup_timeout=60, stop_timeout=30, drain_flag=Path(flag))
sys.exit(group.run())
"""


class Lifecycle:
    """The driver in a process of its own (the group installs signal handlers), its stand-ins'
    records, and what it wrote to stderr."""

    def __init__(self, tmp_path: Path, plans: list[str]) -> None:
        from tests.conftest import free_port

        (tmp_path / "stand_in.py").write_text(STAND_IN)
        count = len(plans) + (len(plans) > 1)  # and the balancer
        self.records = [tmp_path / f"record-{i}" for i in range(count)]
        ports = [free_port() for _ in range(count)]
        self.root = f"http://127.0.0.1:{ports[-1]}"
        spec = [str(tmp_path / "stand_in.py"), plans, [str(r) for r in self.records], ports]
        spec.append(str(tmp_path / "draining"))
        self.process = subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(spec)],
            cwd=Path(__file__).resolve().parent.parent,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []

    def wait_for(self, text: str) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if text in line:
                return
        raise AssertionError(f"{text!r} never came: {self.lines}")

    def end(self) -> int:
        _, rest = self.process.communicate(timeout=60)
        self.lines += rest.splitlines()
        return self.process.returncode

    def record(self, i: int) -> list[str]:
        return self.records[i].read_text().splitlines()


@pytest.mark.parametrize(("code", "status"), [(0, 1), (3, 3)])
def test_one_engine_that_dies_after_start_up_is_not_restarted_and_its_code_passes_through(
    tmp_path: Path, code: int, status: int
) -> None:
    run = Lifecycle(tmp_path, [f"die:{code}"])
    assert run.end() == status  # vLLM's 0 (its engine died) must not pass for a clean stop
    assert [line for line in run.lines if line.startswith("serve: ")] == [
        f"serve: ready: {run.root}/v1",
        f"serve: error: vLLM exited with code {code} unexpectedly: RuntimeError: engine core died",
    ]
    assert run.record(0) == ["start"]  # the process manager restarts serve, not serve vLLM


def test_a_start_up_failure_stops_everything_with_the_engines_code(tmp_path: Path) -> None:
    run = Lifecycle(tmp_path, ["fail:2"])
    assert run.end() == 2
    assert run.lines[-1] == "serve: error: vLLM exited with code 2 during start-up: ValueError: no such model"
    (tmp_path / "two").mkdir()
    run = Lifecycle(tmp_path / "two", ["serve", "fail:2"])
    assert run.end() == 2
    assert (
        run.lines[-1]
        == "serve: error: engine 1 exited with code 2 during start-up: ValueError: no such model"
    )
    assert run.record(0) == ["start", "drained=True"] and not run.records[2].exists()  # no balancer


@pytest.mark.parametrize("engines", [1, 2])
def test_sigterm_drains_every_engine_and_their_code_is_serves(tmp_path: Path, engines: int) -> None:
    plans = ["serve"] if engines == 1 else ["serve", "die:0,serve"]
    run = Lifecycle(tmp_path, plans)
    run.wait_for("serve: ready:")
    if engines == 2:
        assert run.lines[-1].endswith("/v1 (2 engines)")
        run.wait_for("1 of 2 engines serve while it restarts (1 of 3)")
        run.wait_for("serve: engine 1 is back")
    run.process.send_signal(signal.SIGTERM)
    assert run.end() == 0
    for i in range(engines):  # the flag was there before the engine got the signal
        assert run.record(i)[-1] == "drained=True"
    if engines == 2:
        assert run.record(1) == ["start", "start", "drained=True"]
        assert run.record(2)[-1] == "drained=True"  # the balancer, stopped last
    assert not any("error" in line for line in run.lines if "restarts" not in line)


@pytest.mark.parametrize(
    ("draft", "method"), [("grammar", "custom_class"), ("ngram", "ngram")]
)
def test_draft_reaches_vllm_as_its_speculative_config(tmp_path: Path, draft: str, method: str) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings, passthrough = parse_settings(["--model", str(tmp_path), "--draft", draft, "--draft-tokens", "3"])
    check_passthrough(passthrough, settings)
    argv = vllm_argv(settings, str(tmp_path), passthrough)
    spec = AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(argv)).speculative_config
    assert spec is not None and spec["method"] == method and spec["num_speculative_tokens"] == 3
    if draft == "grammar":
        assert spec["model"] == "serve.draft.GrammarDrafter"
    plain = vllm_argv(ServeSettings(model=str(tmp_path)), str(tmp_path), [])
    assert "--speculative-config" not in plain


def test_draft_and_a_passthrough_speculative_config_are_refused_together(tmp_path: Path) -> None:
    settings, passthrough = parse_settings(
        ["--model", str(tmp_path), "--draft", "grammar", "--speculative-config", '{"method": "ngram"}']
    )
    with pytest.raises(LaunchError, match="--draft and vLLM's --speculative-config both choose a drafter"):
        check_passthrough(passthrough, settings)
    # Without --draft, vLLM's own flag passes through as before.
    settings, passthrough = parse_settings(["--model", str(tmp_path), "--speculative-config", "{}"])
    check_passthrough(passthrough, settings)

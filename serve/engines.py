"""Several vLLM engines behind one URL: how many, where each runs (cores, GPU memory share, CUDA
MPS), and the command and environment of each. Each engine is a plain ``python -m serve`` engine
(vLLM's OpenAI server with this project's middleware and flags) on a loopback port; the balancer
(serve/balancer.py) is the one URL, and serve/supervisor.py's EngineGroup runs them all. One
engine (``run_one``) is the same group without a balancer, on ``--host``/``--port`` itself.

Why several: one engine cannot keep an H200 busy with a model this small; its Python loop is the
limit (BENCHMARKS.md). Four engines with CUDA MPS gave twice one engine's extractions/s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serve.launcher import KV_CACHE_ENV, STOP_GRACE_S, LaunchError, local_url, vllm_argv, vllm_server_argv
from serve.settings import ServeSettings
from serve.supervisor import Child, EngineGroup

GPU_MEMORY_FLAG = "--gpu-memory-utilization"
VLLM_DEFAULT_GPU_SHARE = 0.9
# Measured on one H200 (issue 14): 4 engines of 4 cores each beat every other split of 16 cores.
GPU_CORES_PER_ENGINE = 4
# An engine's GPU memory beyond its weights: activations, CUDA graphs and a useful KV cache.
GPU_ENGINE_OVERHEAD_GIB = 6.0
# A CPU engine is an API server plus an engine process (~2.7 GB RSS for the tiny demo model),
# plus its weights and its KV cache; each wants at least one core of its own, better two.
CPU_CORES_PER_ENGINE = 2
CPU_ENGINE_OVERHEAD_GIB = 3.0
MAX_AUTO_ENGINES = 8
MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
MPS_LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# Flags serve sets for each engine itself; a passthrough copy would win (it comes last) and break
# the placement, so they are refused when there are several engines.
_PER_ENGINE_FLAGS = ("--port", "--host", "--uds", "--data-parallel-size", "-dp", "--headless")


@dataclass(frozen=True)
class Machine:
    """What placement depends on, read once (and given by hand in tests)."""

    cores: tuple[int, ...]
    gpu: bool
    gpu_memory_bytes: int | None = None  # the first visible GPU's total memory, when known
    available_memory_bytes: int = 0


@dataclass(frozen=True)
class EngineSpec:
    index: int
    port: int
    cores: tuple[int, ...]  # empty: not pinned
    argv: list[str]
    env: dict[str, str] = field(repr=False)

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def read_machine() -> Machine:
    import psutil

    from serve.launcher import on_cpu

    gpu = not on_cpu()
    return Machine(
        cores=tuple(sorted(os.sched_getaffinity(0))),
        gpu=gpu,
        gpu_memory_bytes=_gpu_memory_bytes() if gpu else None,
        available_memory_bytes=int(psutil.virtual_memory().available),
    )


def _gpu_memory_bytes() -> int | None:
    """Total memory of the GPU the engines share (the first visible one), without creating a CUDA
    context in this process (it would hold GPU memory for the server's lifetime)."""
    try:
        import pynvml
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        pynvml.nvmlInit()
        try:
            handle = (
                pynvml.nvmlDeviceGetHandleByIndex(int(visible))
                if visible.isdigit()
                else pynvml.nvmlDeviceGetHandleByUUID(visible)
            )
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    except (pynvml.NVMLError, ValueError):
        return None


def weights_bytes(model: str) -> int | None:
    """Size of the checkpoint's weight files; None for a hub id or a directory without weights
    (``--load-format dummy`` on a bare config)."""
    path = Path(model)
    if not path.is_dir():
        return None
    total = sum(f.stat().st_size for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
    return total or None


def gpu_share(passthrough: Sequence[str]) -> float:
    """The GPU memory share all engines together may use: vLLM's own flag, else vLLM's default."""
    for i, arg in enumerate(passthrough):
        value = None
        if arg == GPU_MEMORY_FLAG and i + 1 < len(passthrough):
            value = passthrough[i + 1]
        elif arg.startswith(GPU_MEMORY_FLAG + "="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                share = float(value)
            except ValueError:
                raise LaunchError(f"{GPU_MEMORY_FLAG} {value!r} is not a number") from None
            if not 0 < share <= 1:
                raise LaunchError(f"{GPU_MEMORY_FLAG} {share:g} is not a share in (0, 1]")
            return share
    return VLLM_DEFAULT_GPU_SHARE


def without_flag(passthrough: Sequence[str], flag: str) -> list[str]:
    out: list[str] = []
    skip = False
    for i, arg in enumerate(passthrough):
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = i + 1 < len(passthrough)
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out


def auto_engine_count(machine: Machine, model_bytes: int | None, kv_gib: int, share: float) -> int:
    """``--engines auto``. GPU: one engine per 4 cores, no more than fit in the memory share at
    weights + 6 GiB each (weights unknown: cores alone). CPU: one engine per 2 cores, no more than
    fit in available memory at weights + KV cache + 3 GiB each. At least 1, at most 8."""
    cores = len(machine.cores)
    gib = 2**30
    if machine.gpu:
        count = cores // GPU_CORES_PER_ENGINE
        if machine.gpu_memory_bytes and model_bytes:
            per_engine = model_bytes + GPU_ENGINE_OVERHEAD_GIB * gib
            count = min(count, int(share * machine.gpu_memory_bytes // per_engine))
    else:
        count = cores // CPU_CORES_PER_ENGINE
        per_engine = (model_bytes or 0) + (kv_gib + CPU_ENGINE_OVERHEAD_GIB) * gib
        count = min(count, int(machine.available_memory_bytes // per_engine))
    return max(1, min(count, MAX_AUTO_ENGINES))


def resolve_engine_count(
    settings: ServeSettings, machine: Machine, model_bytes: int | None, share: float
) -> int:
    if settings.engines == "auto":
        return auto_engine_count(machine, model_bytes, settings.cpu_kvcache_gib, share)
    assert isinstance(settings.engines, int)
    return settings.engines


def split_cores(cores: Sequence[int], count: int) -> list[tuple[int, ...]]:
    """Disjoint, equal, contiguous shares of the cores this process may use (a remainder stays
    unassigned, for the balancer and the supervisor)."""
    if count > len(cores):
        raise LaunchError(
            f"{count} engines need at least {count} cores and this process may use {len(cores)}; "
            "lower --engines"
        )
    size = len(cores) // count
    return [tuple(cores[i * size : (i + 1) * size]) for i in range(count)]


def cpu_list(cores: Sequence[int]) -> str:
    """ "0-3,8" style, as VLLM_CPU_OMP_THREADS_BIND and taskset read it."""
    runs: list[str] = []
    ordered = sorted(cores)
    start = prev = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == prev + 1:
            prev = core
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if core is not None:
            start = prev = core
    return ",".join(runs)


def check_multi_passthrough(passthrough: Sequence[str]) -> None:
    for flag in _PER_ENGINE_FLAGS:
        if any(arg == flag or arg.startswith(flag + "=") for arg in passthrough):
            raise LaunchError(
                f"{flag} cannot be combined with --engines above 1: serve places each engine itself "
                "(one GPU, loopback ports); use --engines 1 for vLLM's own data parallelism"
            )


def check_memory_fits(
    machine: Machine,
    count: int,
    kv_gib: int,
    model_bytes: int | None = None,
    share: float = VLLM_DEFAULT_GPU_SHARE,
) -> None:
    """CPU: every engine allocates its own KV cache (VLLM_CPU_KVCACHE_SPACE), all at once. GPU:
    every engine's memory share must hold its weights and the overhead beside them, or vLLM finds
    no memory for a KV cache minutes into start-up (four E4B engines on an 80 GB H100, 2026-12-07)."""
    gib = 2**30
    if machine.gpu:
        if not (machine.gpu_memory_bytes and model_bytes):
            return
        each = share * machine.gpu_memory_bytes / count
        need = model_bytes + GPU_ENGINE_OVERHEAD_GIB * gib
        if each < need:
            fit = int(share * machine.gpu_memory_bytes // need)
            raise LaunchError(
                f"{count} engines get {each / gib:.1f} GiB each ({GPU_MEMORY_FLAG} {share:g} of "
                f"{machine.gpu_memory_bytes / gib:.0f} GiB) and each needs {need / gib:.1f} "
                f"({model_bytes / gib:.1f} GiB of weights + {GPU_ENGINE_OVERHEAD_GIB:g}); "
                + (f"use --engines {fit} or fewer" if fit >= 1 else "the model fits one engine at most")
            )
        return
    need = count * kv_gib * gib
    if need > machine.available_memory_bytes:
        raise LaunchError(
            f"{count} engines x {kv_gib} GiB of KV cache ({KV_CACHE_ENV}, per engine) do not fit in the "
            f"{machine.available_memory_bytes / gib:.1f} GiB of memory available; lower --engines or "
            "--cpu-kvcache-gib"
        )


def free_ports(count: int, avoid: Sequence[int] = ()) -> list[int]:
    """Loopback ports nothing listens on now (the engines bind them a moment later)."""
    ports: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in avoid:
                ports.append(port)
    return ports


def plan_engines(
    settings: ServeSettings,
    model: str,
    passthrough: Sequence[str],
    env: Mapping[str, str],
    machine: Machine,
    count: int,
    ports: Sequence[int],
) -> list[EngineSpec]:
    """Every engine's argv and environment. On GPU each gets ``share / count`` of the GPU's memory
    (vLLM's --gpu-memory-utilization, of the whole GPU); with pinning, its own cores and as many
    OpenMP threads; on CPU, its own VLLM_CPU_OMP_THREADS_BIND cores and its own KV cache."""
    check_multi_passthrough(passthrough)
    shares = split_cores(machine.cores, count)
    extra = list(passthrough)
    memory: list[str] = []
    if machine.gpu:
        per_engine = int(gpu_share(passthrough) / count * 1000) / 1000  # rounded down: sums stay below
        extra = without_flag(passthrough, GPU_MEMORY_FLAG)
        memory = [GPU_MEMORY_FLAG, f"{per_engine:g}"]
    specs = []
    for index, (port, cores) in enumerate(zip(ports, shares, strict=True)):
        engine_settings = settings.model_copy(update={"host": "127.0.0.1", "port": port})
        argv = [*vllm_server_argv(), *vllm_argv(engine_settings, model, extra), *memory]
        engine_env = dict(env)
        pinned = settings.pin_cores == "on"
        if pinned:
            engine_env["OMP_NUM_THREADS"] = str(len(cores))
        if not machine.gpu and pinned:
            # vLLM's CPU engine binds its OpenMP threads itself ("auto" would give every engine
            # the same cores).
            engine_env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(cores)
        specs.append(EngineSpec(index, port, cores if pinned else (), argv, engine_env))
    return specs


# -- CUDA MPS ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MpsChoice:
    mode: str  # "platform", "own" or "none"
    reason: str


def choose_mps(setting: str, gpu: bool, env: Mapping[str, str], control: str | None) -> MpsChoice:
    """Whose MPS the engines use. A platform's (CUDA_MPS_PIPE_DIRECTORY already set, as
    Kubernetes' NVIDIA device plugin does) wins; else serve starts its own daemon when
    nvidia-cuda-mps-control exists; ``off`` starts none (for measuring without it)."""
    if setting == "off":
        return MpsChoice("none", "off (--mps off)")
    if not gpu:
        if setting == "on":
            raise LaunchError("--mps on needs a GPU; this machine has none")
        return MpsChoice("none", "not used on CPU")
    if env.get(MPS_PIPE_ENV):
        return MpsChoice("platform", f"the platform's ({MPS_PIPE_ENV}={env[MPS_PIPE_ENV]})")
    if control is not None:
        return MpsChoice("own", f"its own daemon ({control})")
    if setting == "on":
        raise LaunchError(
            f"--mps on: no {MPS_CONTROL} on PATH and no {MPS_PIPE_ENV} set; install the NVIDIA driver's "
            "MPS tools, or use --mps off"
        )
    return MpsChoice("none", f"unavailable (no {MPS_CONTROL}, no {MPS_PIPE_ENV})")


@contextlib.contextmanager
def mps_daemon(control: str) -> Iterator[dict[str, str]]:
    """serve's own MPS control daemon, in its own pipe and log directories, stopped on exit.
    Yields the variables every CUDA process that should use it needs."""
    root = Path(tempfile.mkdtemp(prefix="endpoint-serve-mps-"))
    variables = {MPS_PIPE_ENV: str(root / "pipe"), MPS_LOG_ENV: str(root / "log")}
    for directory in variables.values():
        Path(directory).mkdir()
    env = {**os.environ, **variables}
    started = subprocess.run([control, "-d"], env=env, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        detail = (started.stderr or started.stdout).strip().splitlines()
        raise LaunchError(
            f"{control} -d failed: {detail[-1] if detail else started.returncode}; try --mps off"
        )
    try:
        yield variables
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([control], input="quit\n", env=env, capture_output=True, text=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


# -- the whole group ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPlan:
    specs: list[EngineSpec]
    mps: MpsChoice
    mps_control: str | None
    caddy: str


def plan_group(
    settings: ServeSettings, model: str, passthrough: Sequence[str], env: Mapping[str, str]
) -> GroupPlan | None:
    """The engines, MPS and balancer for ``--engines``; None when that comes to one engine (then
    serve runs exactly as without the flag)."""
    from serve.balancer import caddy_binary

    machine = read_machine()
    model_bytes, share = weights_bytes(model), gpu_share(passthrough)
    count = resolve_engine_count(settings, machine, model_bytes, share)
    if count == 1:
        _say("--engines auto: 1 engine")
        return None
    caddy = caddy_binary()
    check_memory_fits(machine, count, settings.cpu_kvcache_gib, model_bytes, share)
    control = shutil.which(MPS_CONTROL)
    mps = choose_mps(settings.mps, machine.gpu, env, control)
    ports = free_ports(count, avoid=[settings.port])
    specs = plan_engines(settings, model, passthrough, env, machine, count, ports)
    memory = next((s.argv[-1] for s in specs if s.argv[-2] == GPU_MEMORY_FLAG), None) if machine.gpu else None
    _say(
        f"{count} engines on 127.0.0.1:{','.join(str(s.port) for s in specs)}; cores "
        + (" | ".join(cpu_list(s.cores) for s in specs) if specs[0].cores else "not pinned")
        + (f"; {GPU_MEMORY_FLAG} {memory} each" if memory else "")
        + f"; CUDA MPS: {mps.reason}; balancer: {caddy}"
    )
    return GroupPlan(specs, mps, control, caddy)


def run_one(
    settings: ServeSettings, model: str, passthrough: list[str], env: Mapping[str, str], drain_flag: Path
) -> int:
    root = local_url(settings.host, settings.port)
    argv = [*vllm_server_argv(), *vllm_argv(settings, model, passthrough)]
    engine = Child("vLLM", argv, {**env, "ENDPOINT_DRAIN_FLAG": str(drain_flag)})
    return _run_engines(settings, [engine], [root + "/health"], None, drain_flag)


def _run_engines(
    settings: ServeSettings,
    engines: list[Child],
    health_urls: list[str],
    balancer: Child | None,
    drain_flag: Path,
) -> int:
    """Serve until stopped: the one lifecycle of one engine and of several."""
    root = local_url(settings.host, settings.port)
    group = EngineGroup(
        engines,
        health_urls,
        balancer,
        health_url=root + "/health",
        base_url=root + "/v1",
        startup_timeout=settings.startup_timeout,
        stop_timeout=settings.shutdown_timeout + STOP_GRACE_S,
        drain_flag=drain_flag,
    )
    return group.run()


def run_group(settings: ServeSettings, plan: GroupPlan, env: Mapping[str, str], drain_flag: Path) -> int:
    from serve.balancer import caddy_argv, caddyfile

    work = Path(tempfile.mkdtemp(prefix="endpoint-serve-balancer-"))
    try:
        config = work / "Caddyfile"
        config.write_text(
            caddyfile(settings.host, settings.port, [s.port for s in plan.specs], settings.keep_alive)
        )
        # Caddy keeps nothing (persist_config off), but looks for its data and config homes.
        balancer_env = {k: v for k, v in env.items() if k not in ("VLLM_API_KEY", "ENDPOINT_API_KEY")}
        balancer_env.update(XDG_DATA_HOME=str(work / "data"), XDG_CONFIG_HOME=str(work / "config"))
        balancer = Child("the balancer", caddy_argv(plan.caddy, config), balancer_env)
        with contextlib.ExitStack() as stack:
            mps_env: dict[str, str] = {}
            if plan.mps.mode == "own":
                assert plan.mps_control is not None
                mps_env = stack.enter_context(mps_daemon(plan.mps_control))
            engines = [
                Child(
                    f"engine {s.index} (port {s.port})",
                    s.argv,
                    {**s.env, **mps_env, "ENDPOINT_DRAIN_FLAG": str(drain_flag)},
                    s.cores,
                )
                for s in plan.specs
            ]
            health_urls = [s.root_url + "/health" for s in plan.specs]
            return _run_engines(settings, engines, health_urls, balancer, drain_flag)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _say(message: str) -> None:
    import sys

    print(f"serve: {message}", file=sys.stderr, flush=True)

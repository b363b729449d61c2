#!/usr/bin/env bash
# GPU smoke check, for a fresh machine after `pip install -e '.[gpu]'`: serves the demo model in the
# full Gemma4ForConditionalGeneration layout (python -m serve --demo), does one extraction with the
# client, measures one throughput point (guided, then free at the same length; 30 s each), and
# prints one line, PASS or FAIL. Exit status 0 on PASS, 1 on FAIL, 2 on bad arguments.
#
#   scripts/gpu-smoke.sh [--python PATH] [--log-dir DIR] [--port N] [--concurrency N]
#                        [--duration S] [--startup-timeout S] [--allow-cpu] [--dry-run] [-- SERVE_ARGS...]
#
# --python (or $PYTHON): the interpreter with vLLM (default: .venv/bin/python, else python3). The
# project need not be installed: the script runs from the repository root with it on PYTHONPATH.
# SERVE_ARGS go to `python -m serve` (and from there to vLLM); the default on a GPU is
# `--attention-backend TRITON_ATTN`, Gemma 4's two head sizes. --allow-cpu runs the same steps on
# a machine without a GPU (the CPU build serves the text-only layout), to try the script itself.
#
# The demo model is tiny and random, with a planted bias that makes its JSON close, so the number
# measures the serving stack (scheduler, grammar masks, HTTP), not a model's compute: that is where a
# structured-output regression (vLLM issue #49013) shows, as guided/free well below 1.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-}
LOG_DIR=${SMOKE_LOG_DIR:-}
PORT=8011
CONCURRENCY=64
DURATION=30
STARTUP_TIMEOUT=900
ALLOW_CPU=0
DRY_RUN=0
SERVE_ARGS=()
SERVE_ARGS_GIVEN=0
TEXT="Progression-Free Survival (PFS) assessed by RECIST v1.1 using CT scan at 24 weeks"

usage_error() {
    echo "gpu-smoke: error: $1 (see the header of scripts/gpu-smoke.sh)" >&2
    exit 2
}
positive_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || usage_error "$1 expects a whole number >= 1, got '$2'"; }

while (($#)); do
    case $1 in
        --python | --log-dir | --port | --concurrency | --duration | --startup-timeout)
            (($# >= 2)) || usage_error "$1 needs a value"
            case $1 in
                --python) PY=$2 ;;
                --log-dir) LOG_DIR=$2 ;;
                --port) positive_int "$1" "$2" && PORT=$2 ;;
                --concurrency) positive_int "$1" "$2" && CONCURRENCY=$2 ;;
                --duration) positive_int "$1" "$2" && DURATION=$2 ;;
                --startup-timeout) positive_int "$1" "$2" && STARTUP_TIMEOUT=$2 ;;
            esac
            shift 2
            ;;
        --allow-cpu) ALLOW_CPU=1 && shift ;;
        --dry-run) DRY_RUN=1 && shift ;;
        -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
        --) shift && SERVE_ARGS=("$@") && SERVE_ARGS_GIVEN=1 && break ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done
((PORT <= 65535)) || usage_error "--port must be at most 65535, got $PORT"
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
if [[ -z $LOG_DIR ]]; then
    LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke-$(date +%Y%m%d-%H%M%S)-XXXX") || usage_error "cannot create a log directory"
fi
mkdir -p "$LOG_DIR" 2>/dev/null && [[ -w $LOG_DIR ]] || usage_error "log directory '$LOG_DIR' is not writable"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BASE_URL="http://127.0.0.1:$PORT/v1"
SERVER_PID=""

fail() {
    echo "gpu-smoke: FAIL $1; logs: $LOG_DIR"
    exit 1
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 90); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null
    fi
    SERVER_PID=""
}
trap stop_server EXIT
trap 'stop_server; echo "gpu-smoke: FAIL interrupted; logs: $LOG_DIR"; exit 1' INT TERM

# 1. The interpreter, vLLM and the device.
command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY' (give --python PATH)"
if ((DRY_RUN)); then
    DEVICE="(dry run)"
    ON_GPU=1
else
    "$PY" - >"$LOG_DIR/env.txt" 2>&1 <<'EOF'
import platform, sys
import torch, transformers, vllm
import client, serve  # noqa: F401 - the project, from the repository root
gpu = torch.cuda.is_available()
print(f"python {platform.python_version()} vllm {vllm.__version__} transformers {transformers.__version__} torch {torch.__version__}")
print("device", torch.cuda.get_device_name(0) if gpu else "cpu")
print("gpu", int(gpu))
EOF
    (($? == 0)) || fail "cannot import torch, transformers, vllm and the project with $PY ($(tail -n 1 "$LOG_DIR/env.txt"))"
    ON_GPU=$(sed -n 's/^gpu //p' "$LOG_DIR/env.txt")
    DEVICE=$(sed -n 's/^device //p' "$LOG_DIR/env.txt")
    ((ON_GPU || ALLOW_CPU)) || fail "torch sees no CUDA GPU (device: $DEVICE); pass --allow-cpu to try the script on a CPU"
fi
if ((!SERVE_ARGS_GIVEN && ON_GPU)); then SERVE_ARGS=(--attention-backend TRITON_ATTN); fi
LAYOUT=$( ((ON_GPU)) && echo full || echo text-only)

SERVE_CMD=("$PY" -m serve --demo --demo-dir "$LOG_DIR/demo" --port "$PORT" "${SERVE_ARGS[@]}")
EXTRACT_CMD=("$PY" -m client --base-url "$BASE_URL" extract "$TEXT")
BENCH_CMD=("$PY" benchmarks/throughput.py --base-url "$BASE_URL" --concurrency "$CONCURRENCY"
    --modes guided,free --duration "$DURATION" --out "$LOG_DIR/throughput.json"
    --label smoke=gpu-smoke --label "layout=$LAYOUT")
if ((DRY_RUN)); then
    echo "python: $PY"
    echo "logs: $LOG_DIR"
    printf 'serve:'; printf ' %q' "${SERVE_CMD[@]}"; echo
    printf 'extract:'; printf ' %q' "${EXTRACT_CMD[@]}"; echo
    printf 'throughput:'; printf ' %q' "${BENCH_CMD[@]}"; echo
    exit 0
fi

# 2. Serve the demo (build, merge, start vLLM; its log is server.log); a crash ends the wait at once.
STARTED=$(date +%s)
setsid "${SERVE_CMD[@]}" >"$LOG_DIR/server.log" 2>&1 &
SERVER_PID=$!
until "$PY" -c "import httpx, sys; sys.exit(httpx.get('$BASE_URL/models', timeout=5).status_code != 200)" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited during start-up: $(grep -v '^\s*$' "$LOG_DIR/server.log" | tail -n 1 | cut -c1-300)"
    (($(date +%s) - STARTED < STARTUP_TIMEOUT)) || fail "the server did not answer within ${STARTUP_TIMEOUT}s"
    sleep 3
done
START_S=$(($(date +%s) - STARTED))
MERGED=$LOG_DIR/demo/$( ((ON_GPU)) && echo merged || echo merged-text-only)
ARCH=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['architectures'][0])" "$MERGED/config.json" 2>/dev/null)
[[ $ARCH == "$( ((ON_GPU)) && echo Gemma4ForConditionalGeneration || echo Gemma4ForCausalLM)" ]] ||
    fail "served $MERGED is '$ARCH', not the $LAYOUT layout"

# 3. One extraction through the client, checked against the schema.
"${EXTRACT_CMD[@]}" >"$LOG_DIR/extraction.json" 2>"$LOG_DIR/extraction.err" ||
    fail "extraction failed: $(tail -n 1 "$LOG_DIR/extraction.err")"
"$PY" -c "import sys; from client.models import EndpointExtraction as E; E.model_validate_json(open(sys.argv[1]).read())" \
    "$LOG_DIR/extraction.json" 2>"$LOG_DIR/extraction.err" || fail "the extraction is not schema-valid: $(tail -n 1 "$LOG_DIR/extraction.err")"

# 4. One throughput point: guided, then free at the guided answers' mean length.
"${BENCH_CMD[@]}" >"$LOG_DIR/throughput.log" 2>&1 || fail "throughput run failed: $(tail -n 1 "$LOG_DIR/throughput.log" | cut -c1-300)"
SUMMARY=$("$PY" - "$LOG_DIR/throughput.json" <<'EOF'
import json, sys
points = {p["mode"]: p for p in json.load(open(sys.argv[1]))["points"]}
g, f = points["guided"], points.get("free")
problems = []
if g["ok"] == 0 or g["valid"] != g["ok"] or g["errors"]:
    problems.append(f"guided: {g['ok']} answers, {g['valid']} schema-valid, {g['errors']} errors")
if g["hit_max_tokens"]:
    problems.append(f"guided: {g['hit_max_tokens']} answers hit max_tokens")
ratio = g["extra"].get("guided_over_free_tok_s")
line = (
    f"c={g['concurrency']}: guided {g['output_tokens_per_s']:.0f} tok/s, {g['extractions_per_s'] or 0:.1f} extractions/s, "
    f"{g['tokens_per_extraction'] or 0:.0f} tok/extraction; free {f['output_tokens_per_s'] if f else 0:.0f} tok/s; "
    f"guided/free {ratio if ratio is not None else '-'}"
)
print(("BAD " + "; ".join(problems)) if problems else line)
EOF
)
[[ -n $SUMMARY && $SUMMARY != BAD* ]] || fail "${SUMMARY#BAD }"
stop_server
echo "gpu-smoke: PASS $LAYOUT layout on $DEVICE, served in ${START_S}s, one schema-valid extraction; $SUMMARY; logs: $LOG_DIR"

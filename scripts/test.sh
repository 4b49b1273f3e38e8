#!/usr/bin/env bash
# Install, then run the test suite (unit + integration against real Postgres/pgvector).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAGAS_DO_NOT_TRACK=true
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

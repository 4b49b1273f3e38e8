#!/usr/bin/env bash
# The main job on embedded defaults (no services, no GPU): install, then run the whole pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAGAS_DO_NOT_TRACK=true
exec .venv/bin/fibreflow main "$@"

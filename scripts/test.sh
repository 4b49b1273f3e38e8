#!/usr/bin/env bash
# Install, then run the test suite (unit + integration against real Postgres/pgvector).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The arena page's test drives a real browser: Debian's chromium (Playwright's own download cannot be reached).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the browser test needs Debian's chromium: run as root, or apt-get install chromium first" >&2; exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAGAS_DO_NOT_TRACK=true
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

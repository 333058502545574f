#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run the whole suite (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
# The browser test drives Debian's chromium (never a downloaded browser build).
if [ ! -x /usr/bin/chromium ]; then
  echo "Installing Debian chromium for the browser test ..." >&2
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q tests "$@"

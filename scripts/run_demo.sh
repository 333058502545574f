#!/usr/bin/env bash
# Set up on a fresh machine, then run the demo on the embedded default preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
export GRADIO_ANALYTICS_ENABLED=False
if [ -f app.py ]; then
  exec .venv/bin/python app.py "$@"
fi
# Until the web app lands: animate the example first frame with the CLI.
exec .venv/bin/python -m magic_demo generate --image assets/examples/red_circle.png \
  --prompt "a red circle moves left on a black background" --seconds 4 --out outputs/demo.mp4 \
  --report outputs/demo.json "$@"

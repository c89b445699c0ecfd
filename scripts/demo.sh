#!/usr/bin/env bash
# Set everything up, then run test_input.json (a generate job) through the real RunPod handler
# on the tiny offline model. The wav lands in outputs/<job id>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DEFAULT_MODEL=${DEFAULT_MODEL:-tiny} HF_HUB_OFFLINE=1
exec .venv/bin/python handler.py "$@"

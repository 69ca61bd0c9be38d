#!/usr/bin/env bash
# The README's main job: set up, then compare the structured methods on the packaged
# SmolLM2 with the Python documentation as calibration and evaluation text (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
exec harness compare "$@"

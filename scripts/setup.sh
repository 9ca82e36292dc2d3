#!/usr/bin/env bash
# Set up .venv with moe-adapter (editable) and its dev tools.
# torch: if .venv has none yet, install torch==2.13.0 (on the project's CPU machines pip takes the
# CPU wheel that lies on disk; elsewhere PyPI's build). Install your own CUDA torch first to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[dev]"
echo "setup: $(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null || .venv/bin/python -c 'import torch; print("torch", torch.__version__)')"

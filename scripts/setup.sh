#!/usr/bin/env bash
# Set up .venv with moe-adapter (editable) and its dev tools.
# torch: if .venv has none yet, install torch==2.13.0 (on the project's CPU machines pip takes the
# CPU wheel that lies on disk; elsewhere PyPI's build). Install your own CUDA torch first to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
# espeak-ng speaks the corpus's speech items (Debian package; needs root or sudo to install).
if ! command -v espeak-ng >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
    else
        echo "setup: espeak-ng is missing and cannot be installed without root: apt-get install espeak-ng" >&2
    fi
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[dev]"
echo "setup: $(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>/dev/null || .venv/bin/python -c 'import torch; print("torch", torch.__version__)')"

#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the platform and its tests need.
# Idempotent: a second run only checks that the pinned packages are present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are pinned as a pair: open_clip needs torchvision, and mismatched wheels fail to import.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, open_clip, ray, mlflow, optuna; print('environment ready: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"

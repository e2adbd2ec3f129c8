"""Evaluation: data, prompts and metrics for measuring what pruning costs in quality, and runs that put
pruned variants beside the full model (scores, retention, TTFT speedup, kept share), resumable.

    from trimformer_lab.evaluation import longbench_items, parse_variants, run_evaluation
    items = longbench_items(tokenizer, tasks="hotpotqa,trec", limit=2, budget=4096)
    data = run_evaluation("longbench", model, tokenizer, parse_variants("lazy,random", "default,0.7"),
                          items, json_path="out/longbench.json")
"""

from .longbench import GROUPS as LONGBENCH_GROUPS
from .longbench import TASKS as LONGBENCH_TASKS
from .longbench import build_prompt, load_longbench, middle_truncate
from .metrics import (
    classification_score,
    code_sim_score,
    count_score,
    kl_divergence,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l,
    token_agreement,
)
from .report import format_table, load_results, report, write_plots
from .backend import TrimformerBackend, greedy_decode
from .items import EvalItem
from .runner import Evaluation
from .store import ResultStore
from .variants import Variant, parse_variants
from .tasks import fidelity_items, longbench_items, needle_items, run_evaluation

__all__ = [
    "LONGBENCH_GROUPS",
    "LONGBENCH_TASKS",
    "EvalItem",
    "Evaluation",
    "ResultStore",
    "TrimformerBackend",
    "Variant",
    "build_prompt",
    "classification_score",
    "code_sim_score",
    "count_score",
    "fidelity_items",
    "format_table",
    "greedy_decode",
    "kl_divergence",
    "load_longbench",
    "load_results",
    "longbench_items",
    "middle_truncate",
    "needle_items",
    "normalize_answer",
    "parse_variants",
    "qa_f1_score",
    "report",
    "retrieval_score",
    "rouge_l",
    "run_evaluation",
    "token_agreement",
    "write_plots",
]

"""The demo: a long real prompt (Paul Graham essays with one fact hidden in them, and a question
about it) answered by the same model with and without pruning, side by side."""

from __future__ import annotations

from trimformer.api import stats, trim, untrim
from trimformer.config import TrimConfig
from trimformer.generation import greedy
from trimformer.loading import load_model

from .bench import time_to_first_token
from .evaluation.needle import found, make_needle


def run_demo(model_name: str = "smollm2-135m", length: int = 4096, depth: float = 0.35,
             config: TrimConfig | None = None, max_new_tokens: int = 12) -> dict:
    config = config or TrimConfig()
    print(f"loading {model_name} ...", flush=True)
    model, tokenizer = load_model(model_name)
    item = make_needle(tokenizer, length, depth, seed=7)
    print(f"prompt: {item.length} tokens of Paul Graham essays; a fact is hidden at {depth:.0%} of them.")
    print(f"question (end of the prompt): {item.question!r}\n")

    # warm up both paths once so neither pays first-call costs
    time_to_first_token(model, item.input_ids[:, -512:])
    full = greedy(model, item.input_ids, max_new_tokens, tokenizer.eos_token_id)
    trim(model, config)
    trimmed = greedy(model, item.input_ids, max_new_tokens, tokenizer.eos_token_id)
    info = stats(model)
    untrim(model)

    rows = []
    for name, gen in (("full model", full), (f"trimmed ({config.method})", trimmed)):
        answer = tokenizer.decode(gen.tokens, skip_special_tokens=True).strip()
        ok = "correct" if found(item.answer, answer) else "wrong"
        rows.append(answer)
        print(f"{name:>18}: {answer!r} ({ok}; expected {item.answer})  TTFT {gen.ttft_s:.2f} s")
    speedup = full.ttft_s / trimmed.ttft_s
    print(f"\nTTFT speedup {speedup:.2f}x; the trimmed model computed {info['kept_fraction']:.1%} of the "
          f"token-layer work (FLOPs ratio {info['flop_ratio']:.2f}x); schedule {info['schedule']}; "
          f"{info['revived']} tokens revived while decoding.")
    return {"full": rows[0], "trimmed": rows[1], "speedup": speedup, "kept_fraction": info["kept_fraction"]}

"""Analytic FLOPs of a decoder prefill, full and trimmed, from per-layer token counts."""

from __future__ import annotations


def layer_linear_flops_per_token(config) -> int:
    """2 x parameters of one decoder layer's projections and MLP (gated MLP for the Llama family)."""
    d = config.hidden_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = d * config.num_attention_heads * hd
    kv = 2 * d * config.num_key_value_heads * hd
    o = config.num_attention_heads * hd * d
    mlp = 3 * d * config.intermediate_size
    return 2 * (q + kv + o + mlp)


def attention_flops(config, n_tokens: int) -> int:
    """QK^T and AV for `n_tokens` causal queries over themselves: 4 x H x hd x n(n+1)/2."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 4 * config.num_attention_heads * hd * n_tokens * (n_tokens + 1) // 2


def prefill_flops(config, tokens_per_layer: list[list[int]]) -> int:
    """FLOPs of a prefill where row b computes `tokens_per_layer[l][b]` tokens at layer l
    (kept tokens attend causally to the kept tokens of their layer), plus one LM-head row per row."""
    per_token = layer_linear_flops_per_token(config)
    total = 0
    for row_counts in tokens_per_layer:
        for n in row_counts:
            total += per_token * n + attention_flops(config, n)
    rows = len(tokens_per_layer[0]) if tokens_per_layer else 0
    return total + rows * 2 * config.hidden_size * config.vocab_size


def decode_step_flops(config, kv_per_layer: list[int]) -> int:
    """FLOPs of one decoding step (one new token per row) whose query attends to `kv_per_layer[l]` cached
    slots at layer l: the layers' projections and MLP, QK^T and AV (4 x H x hd x slots), and the LM head."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = layer_linear_flops_per_token(config)
    attention = sum(4 * config.num_attention_heads * hd * k for k in kv_per_layer)
    return per_token * len(kv_per_layer) + attention + 2 * config.hidden_size * config.vocab_size

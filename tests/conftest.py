"""Shared fixtures for the core tests: tiny randomly initialised Llama-family models (no network)."""

from __future__ import annotations

import math
import shutil
import tempfile

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import trimformer

# The machine is shared: keep every test on one thread.
torch.set_num_threads(1)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=False)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY, sliding_window=None)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16, use_sliding_window=False)),
    # sliding-window attention: a window of 16 positions, shorter than the test prompts
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **TINY, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)),
    "mistral-sliding": lambda: MistralForCausalLM(MistralConfig(**TINY, sliding_window=16)),
    "qwen2-sliding": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16,
                                                          max_window_layers=3)),
}


def make_model(arch: str = "llama", seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    model.config._attn_implementation = attn
    return model


def make_prompt(length: int, seed: int = 0, batch: int = 1, low: int = 1) -> torch.Tensor:
    """(batch, length) random token ids in [low, 128) from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, TINY["vocab_size"], (batch, length), generator=generator)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D rows -> left-padded (B, T) ids and 0/1 attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


def right_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
    return ids, mask


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """Number of forward hooks / pre-hooks on the base model and all its decoder layers."""
    base = model.model
    modules = [base, *base.layers]
    return {
        "pre": sum(len(m._forward_pre_hooks) for m in modules),
        "post": sum(len(m._forward_hooks) for m in modules),
    }


def assert_unpatched(model: torch.nn.Module, attn: str = "sdpa") -> None:
    base = model.model
    for module in [base, *base.layers]:
        assert not module._forward_hooks, f"left a forward hook on {type(module).__name__}"
        assert not module._forward_pre_hooks, f"left a forward pre-hook on {type(module).__name__}"
    assert not trimformer.is_trimmed(model)
    assert model.config._attn_implementation == attn


def trim_state(output):
    """The TrimState attached to a forward's KV cache."""
    state = getattr(output.past_key_values, "_trimformer_state", None)
    assert state is not None, "the KV cache carries no _trimformer_state"
    return state


def row_positions(state, layer: int, row: int = 0) -> list[int]:
    """Original positions of the valid slots of `layer`'s cache, for one row, in slot order."""
    slots = state.slots[layer]
    return slots.positions[row][slots.valid[row]].tolist()


def expected_counts(n: int, plan: dict[int, float], num_layers: int, protected: int) -> list[int]:
    """Tokens computed at each layer for an n-token prompt: ceil(keep * live), at least the protected."""
    counts, live = [], n
    for layer in range(num_layers):
        counts.append(live)
        if layer in plan:
            live = min(live, max(math.ceil(plan[layer] * live), protected))
    return counts


def keys_by_hand(model, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE(k_proj(input_layernorm(hidden)), positions) for `layer`: (B, N, D), (B, N) -> (B, Hkv, N, hd)."""
    block = model.model.layers[layer]
    attn = block.self_attn
    b, n, _ = hidden.shape
    k = attn.k_proj(block.input_layernorm(hidden)).view(b, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, positions)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k


@pytest.fixture
def llama():
    model = make_model("llama")
    yield model
    if trimformer.is_trimmed(model):
        trimformer.untrim(model)


@pytest.fixture
def prompt100():
    return make_prompt(100, seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """A new local Ray cluster (2 CPUs, no dashboard, its own temp folder) shared by the whole test session;
    yields its address and shuts it down at the end. Skips where Ray is not installed."""
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install -e ".[ray]")')
    temp = tempfile.mkdtemp(prefix="ray")          # short: Ray's socket paths live under it
    info = ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp)
    yield info.address_info["address"]
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)

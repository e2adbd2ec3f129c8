"""The key-norm scorer: registered from its own file, kept sets equal to a by-hand ranking of key norms."""

import torch

import trimformer
from trimformer.registry import get_method, method_names
from conftest import keys_by_hand, make_model, make_prompt, row_positions, trim_state


def test_key_norm_is_a_method_from_the_registry():
    assert "key_norm" in method_names()
    method = get_method("key_norm")
    assert method.prunes_prefill and method.needs("keys") and not method.needs_attention
    assert method.applies_to == {"decoder"}


def test_key_norm_keeps_the_lowest_key_norms():
    """After layer 1 the kept tokens are the protected ones plus the 30 others whose layer-1 keys (computed by
    hand from the unpatched model's hidden states) have the lowest mean norm over KV heads."""
    ids = make_prompt(100, seed=43)
    model = make_model("llama")
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]          # input of layer 1
        keys = keys_by_hand(model, 1, hidden, torch.arange(100)[None])            # (1, Hkv, 100, hd)
    norms = keys.norm(dim=-1).mean(dim=1)[0]                                      # (100,)
    trimformer.trim(model, method="key_norm", keep=0.5, layers=(1,))
    with torch.no_grad():
        state = trim_state(model(ids))
    protected = set(range(4)) | set(range(84, 100))
    ranked = [p for p in norms.argsort().tolist() if p not in protected]
    assert row_positions(state, 2) == sorted(protected | set(ranked[:30]))
    assert trimformer.stats(model)["kept_tokens_per_layer"] == [100, 100, 50, 50, 50, 50]
    trimformer.untrim(model)


def test_key_norm_with_runtime_and_as_scorer_option():
    """key_norm composes with decode-time eviction, spelled as a method suffix or as scorer + mechanisms."""
    ids = make_prompt(100, seed=44)
    outputs = []
    for options in ({"method": "key_norm+runtime"}, {"scorer": "key_norm", "mechanisms": ["prune", "evict"]}):
        model = make_model("llama")
        trimformer.trim(model, keep=0.5, layers=(1,), budget=0.5, evict_every=2, **options)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        outputs.append(out)
        assert trimformer.stats(model)["total_tokens_pruned"] > 0
        trimformer.untrim(model)
    assert torch.equal(outputs[0], outputs[1])

"""Sharded models: a model dispatched by accelerate (`device_map` with disk offload, `cpu_offload`, or
layers spread over GPUs when there are any) trims with every decoder method, gives the outputs of the
same model unsharded, keeps trimformer's state on each layer's execution device (never on the meta
device where offloaded weights wait), and keeps accelerate's hooks through `trim` and `untrim`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import cpu_offload
from conftest import assert_unpatched, left_pad, make_model, make_prompt
from transformers import AutoModelForCausalLM

import trimformer
from trimformer.api import PATCH_ATTR
from trimformer.patch.attention_hook import PROBE_KWARG
from trimformer.patch.cache_names import cache_kwargs
from trimformer.pruners.sdtp import PrunerConfig, SaliencyPruner, model_signature

LAYERS = 6
STEPS = 6

METHODS = {
    "lazy": dict(method="lazy", keep=0.5, layers=(1, 3), revive_threshold=0.0, revive_max=4),
    "random": dict(method="random", keep=0.5, layers=(1, 3)),
    "static": dict(method="static", keep=0.5, layers=(2,)),
    "truncate": dict(method="truncate", keep=0.6, layers=(1, 4)),
    "runtime": dict(method="runtime", budget=0.5, evict_every=2, readmit_every=2, readmit_threshold=0.5,
                    shadow_size=10, recent=4),
    "lazy+runtime": dict(method="lazy+runtime", keep=0.6, layers=(1, 3), budget=0.5, evict_every=2,
                         readmit_every=2, recent=4),
    "sdtp": dict(method="sdtp", keep=0.5, layers=(1, 3)),
}


def _device_map(second: str, main: str = "cpu") -> dict[str, str]:
    """Embeddings and layers 0-2 on `main`; layers 3-5, the final norm and the LM head on `second`."""
    dmap = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": second, "lm_head": second}
    dmap.update({f"model.layers.{i}": main if i < 3 else second for i in range(LAYERS)})
    return dmap


def _gpu_map() -> dict[str, str]:
    """Layers round-robin over the GPUs, the last one offloaded to CPU RAM (run on GPU 0)."""
    n = torch.cuda.device_count()
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": n - 1, "lm_head": n - 1}
    dmap.update({f"model.layers.{i}": (i * n // LAYERS if i < LAYERS - 1 else "cpu") for i in range(LAYERS)})
    return dmap


PLACEMENTS = ["disk", "cpu_offload", pytest.param("gpus", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: layers spread over the GPUs (and CPU RAM)"))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved as a checkpoint, and a random SDTP pruner for it (stages 1 and 3)."""
    folder = tmp_path_factory.mktemp("tiny")
    model = make_model("llama")
    model.save_pretrained(folder / "model")
    torch.manual_seed(0)
    SaliencyPruner(PrunerConfig(signature=model_signature(model.config), layers=[1, 3], hidden=8)).save(folder / "pruner")
    return folder


def _load(saved, placement: str, tmp_path):
    """(model, execution device of each layer) as the placement lays it out."""
    path = saved / "model"
    if placement == "disk":
        model = AutoModelForCausalLM.from_pretrained(path, device_map=_device_map("disk"),
                                                     offload_folder=str(tmp_path / "offload"))
        return model.eval(), [torch.device("cpu")] * LAYERS
    if placement == "cpu_offload":
        model = cpu_offload(AutoModelForCausalLM.from_pretrained(path).eval(), execution_device=torch.device("cpu"))
        return model, [torch.device("cpu")] * LAYERS
    dmap = _gpu_map()
    model = AutoModelForCausalLM.from_pretrained(path, device_map=dmap).eval()
    devices = [torch.device("cuda", dmap[f"model.layers.{i}"] if i < LAYERS - 1 else 0) for i in range(LAYERS)]
    return model, devices


def _options(name: str, saved) -> dict:
    options = dict(METHODS[name])
    if name == "sdtp":
        options["pruner"] = str(saved / "pruner")
    return options


def _inputs(device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_pad([make_prompt(90, seed=3)[0], make_prompt(70, seed=4)[0]])
    return ids.to(device), mask.to(device)


@torch.no_grad()
def _trace(model, ids, mask) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Prefill logits (B, T, V), then STEPS greedy steps: their logits (B, V) and tokens (B, STEPS)."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    prefill, cache = out.logits, out.past_key_values
    token, steps, tokens = prefill[:, -1].argmax(-1), [], []
    for _ in range(STEPS):
        tokens.append(token)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = model(input_ids=token[:, None], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits[:, -1])
        token = out.logits[:, -1].argmax(-1)
    return prefill, steps, torch.stack(tokens, 1)


def _state_tensors(state):
    """(what, layer, tensor) for every tensor trimformer keeps per layer: KV slot positions, aux cache,
    accumulated scores and shadow set."""
    for layer, slots in enumerate(state.slots):
        if slots is not None:
            yield "slots", layer, slots.positions
            yield "slots", layer, slots.valid
    for layer, entry in state.aux.items():
        for f in dataclasses.fields(entry):
            yield f"aux.{f.name}", layer, getattr(entry, f.name)
    if state.runtime is not None:
        for layer in range(LAYERS):
            if state.runtime.scores[layer] is not None:
                yield "scores", layer, state.runtime.scores[layer]
            shadow = state.runtime.shadow[layer]
            if shadow is not None:
                for name in shadow.FIELDS:
                    yield f"shadow.{name}", layer, getattr(shadow, name)


def _accelerate_hooks(model) -> dict[str, tuple]:
    """Every module's accelerate hook and the forward it installed (same objects = still in place)."""
    return {name: (m._hf_hook, m.__dict__.get("forward"))
            for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


def _spy_layer_inputs(model, seen: list) -> list:
    """Pre-hooks (after trimformer's) recording the device of each tensor trimformer hands a layer."""
    def spy(layer):
        def hook(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            handed = [cos, sin, kwargs["position_ids"]]
            if kwargs.get("attention_mask") is not None:
                handed.append(kwargs["attention_mask"])
            if kwargs.get(PROBE_KWARG) is not None:
                handed.append(kwargs[PROBE_KWARG].query_index)
            seen.extend((layer, t.device) for t in handed)
        return hook

    return [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", list(METHODS))
def test_sharded_trimmed_run_equals_unsharded(saved, tmp_path, placement, name):
    model, devices = _load(saved, placement, tmp_path)
    main = devices[0]
    reference = AutoModelForCausalLM.from_pretrained(saved / "model").eval().to(main)
    ids, mask = _inputs(main)
    options = _options(name, saved)

    trimformer.trim(reference, **options)
    want = _trace(reference, ids, mask)
    want_stats = trimformer.stats(reference)

    hooks = _accelerate_hooks(model)
    weights = {n: p.device for n, p in model.named_parameters()}
    assert "meta" in {d.type for d in weights.values()}       # some weights wait offloaded
    trimformer.trim(model, **options)
    assert _accelerate_hooks(model) == hooks
    seen: list = []
    spies = _spy_layer_inputs(model, seen)
    got = _trace(model, ids, mask)
    for spy in spies:
        spy.remove()
    got_stats = trimformer.stats(model)

    torch.testing.assert_close(got[0].to(main), want[0], rtol=1e-4, atol=1e-5)
    for step_got, step_want in zip(got[1], want[1]):
        torch.testing.assert_close(step_got.to(main), step_want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got[2].to(main), want[2])
    for key in ("kept_tokens_per_layer", "revived_per_layer", "waiting_in_aux", "total_tokens_pruned",
                "total_tokens_reintroduced", "total_tokens_dropped"):
        assert got_stats.get(key) == want_stats.get(key), key
    if name in ("lazy", "runtime"):   # the options make revival and readmission happen
        assert got_stats.get("revived", 0) + got_stats.get("total_tokens_reintroduced", 0) > 0

    # trimformer's state sits on each layer's execution device, none of it on the meta device
    state = getattr(model, PATCH_ATTR).state
    held = list(_state_tensors(state))
    assert {what.split(".")[0] for what, _, _ in held} >= {"slots"}
    for what, layer, tensor in held:
        assert tensor.device == devices[layer], (what, layer, tensor.device)
    assert len(seen) >= 3 * LAYERS * (STEPS + 1)
    for layer, device in seen:
        assert device == devices[layer], (layer, device)
    assert {n: p.device for n, p in model.named_parameters()} == weights   # no weight was moved

    trimformer.untrim(model)
    assert_unpatched(model)
    assert _accelerate_hooks(model) == hooks
    trimformer.untrim(reference)
    full_want, full_got = _trace(reference, ids, mask), _trace(model, ids, mask)
    torch.testing.assert_close(full_got[0].to(main), full_want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(full_got[2].to(main), full_want[2])


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generate_on_a_sharded_trimmed_model(saved, tmp_path, placement):
    model, devices = _load(saved, placement, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(saved / "model").eval().to(devices[0])
    ids, mask = _inputs(devices[0])
    outputs = []
    for m in (reference, model):
        trimformer.trim(m, **METHODS["lazy"])
        outputs.append(m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False))
        assert trimformer.stats(m)["revived"] > 0
    assert torch.equal(outputs[1].to(devices[0]), outputs[0])

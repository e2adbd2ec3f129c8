"""NVIDIA kvpress presses beside trimformer: the same model, items, metrics and results format.

Run it through `benchmarks/kvpress_compare.sh`, which creates the separate virtual environment kvpress
needs (transformers < 5.3) with trimformer installed into it, so the items come from the very same
loaders (`trimformer_lab.evaluation`) and the rows land in the same JSON/table format:

    benchmarks/kvpress_compare.sh longbench --limit 2 --match results/longbench.json --json results/longbench_kvpress.json
    trimformer eval report results/longbench.json results/longbench_kvpress.json --table results/longbench.md

How a press runs. kvpress compresses the KV cache *after* each layer's attention during the prefill;
the prefill itself is the full model's, so the first token is the full model's and only the decoding
reads the compressed cache. That is why there is no TTFT gain to expect. The whole prompt (question
included, as SnapKV's paper uses it) goes through the press, the same input trimformer sees.

Timing. By default one prefill per prompt serves the full model and every press: a hook after each
layer's attention hands the layer's keys and values to each press in turn and keeps each press's
compressed copy in its own cache (the prefill's outputs do not depend on the compression, so each copy
is exactly what that press alone would produce). The time each press spends compressing is measured;
a press's TTFT = the prefill without any compression + its own compression time. `--separate` instead
runs one prefill per press (TTFT measured end to end; slower). Presses that need attention weights
(ObservedAttention) get their own prefill with eager attention, and their TTFT is measured against an
eager prefill, which is slower than SDPA: their speedup is against the SDPA full model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trimformer_lab.evaluation.backend import greedy_decode

PRESSES = {
    "snapkv": "SnapKVPress",
    "streamingllm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "observed": "ObservedAttentionPress",
    "knorm": "KnormPress",
}
NEEDS_ATTENTION = {"observed"}
DECODING = "decoding-"        # "decoding-knorm": kvpress's decoding press around that scorer
DECODING_INTERVAL = 8         # steps between compressions (trimformer runtime's evict_every)


def make_press(name: str, ratio: float):
    """A prefill press, or for "decoding-<press>" kvpress's CompressionRatioDecodingPress, which keeps
    (1 - ratio) of all tokens seen, compressing every DECODING_INTERVAL decoding steps."""
    import kvpress

    base = name[len(DECODING):] if name.startswith(DECODING) else name
    if base not in PRESSES or base in NEEDS_ATTENTION and base != name:
        known = list(PRESSES) + [DECODING + p for p in PRESSES if p not in NEEDS_ATTENTION]
        raise SystemExit(f"unknown press {name!r}; known: {', '.join(known)}")
    if base != name:
        return kvpress.CompressionRatioDecodingPress(
            base_press=getattr(kvpress, PRESSES[base])(), target_compression_ratio=ratio,
            compression_interval=DECODING_INTERVAL)
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


def is_decoding(variant) -> bool:
    return variant.method.startswith(DECODING)


@dataclass
class _Prefill:
    key: tuple
    logits: torch.Tensor
    caches: dict        # variant -> cache (the full model's under the full variant)
    ttft: dict          # variant -> seconds
    kv: dict            # variant -> kept share of the prompt's KV entries


class KVPressBackend:
    """A `trimformer_lab.evaluation` backend: the full model and kvpress presses."""

    name = "kvpress"

    def __init__(self, presses: dict, separate: bool = False):
        self.presses = presses          # Variant -> press object
        self.separate = separate
        self._prefill: _Prefill | None = None

    def describe(self, model, variant) -> dict[str, Any]:
        import kvpress

        if variant.method == "full":
            return {"method": "full", "keep": 1.0}
        press = self.presses[variant]
        ratio = press.target_compression_ratio if is_decoding(variant) else press.compression_ratio
        return {"method": variant.method, "keep": round(1.0 - ratio, 4),
                "compression_ratio": ratio, "press": repr(press),
                "kvpress": getattr(kvpress, "__version__", "0.5.5"), "separate": self.separate}

    # -- prefill --
    def _run_prefill(self, model, input_ids, group: list, eager: bool):
        """One prefill with hooks: each press in `group` compresses its own copy of every layer's KV."""
        from transformers import DynamicCache

        from kvpress.utils import extract_keys_and_values

        caches = {v: DynamicCache() for v in group}
        spent = {v: 0.0 for v in group}
        for v in group:
            self.presses[v].post_init_from_model(model)
        base = model.model

        def hook(module, args, kwargs, output):
            cache = kwargs["past_key_values"]
            keys, values = extract_keys_and_values(cache, module.layer_idx)
            for v in group:
                start = time.perf_counter()
                k, val = self.presses[v].compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
                spent[v] += time.perf_counter() - start
                caches[v].update(k.contiguous(), val.contiguous(), module.layer_idx)
            return output

        previous = model.config._attn_implementation
        if eager and previous != "eager":
            model.set_attn_implementation("eager")
        handles = []
        try:
            for layer in base.layers:
                layer.self_attn.rotary_emb = base.rotary_emb
                handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
            main = DynamicCache()
            start = time.perf_counter()
            with torch.inference_mode():
                out = model(input_ids=input_ids, past_key_values=main, use_cache=True, logits_to_keep=1)
                out.logits[:, -1].argmax(-1)
            total = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
            if eager and previous != "eager":
                model.set_attn_implementation(previous)
        bare = total - sum(spent.values())
        return out.logits, main, bare, caches, spent

    def _prefill_for(self, model, slot, input_ids) -> _Prefill:
        key = (input_ids.shape[1], int(input_ids.sum()), int(input_ids[0, :64].sum()), int(input_ids[0, -64:].sum()))
        if self._prefill is not None and self._prefill.key == key and slot in self._prefill.caches:
            return self._prefill
        press_variants = [v for v in self.presses if not is_decoding(v)]
        total = input_ids.shape[1] * len(model.model.layers)
        groups: list[tuple[list, bool]]
        if self.separate:
            groups = [([v], v.method in NEEDS_ATTENTION) for v in press_variants]
        else:
            sdpa = [v for v in press_variants if v.method not in NEEDS_ATTENTION]
            eager = [v for v in press_variants if v.method in NEEDS_ATTENTION]
            groups = [(sdpa, False)] + ([(eager, True)] if eager else [])
        caches, ttft, kv = {}, {}, {}
        logits = None
        for i, (group, eager) in enumerate(groups):
            logits_g, main, bare, press_caches, spent = self._run_prefill(model, input_ids, group, eager)
            if i == 0:  # the full model: the first (SDPA) prefill without any compression
                logits = logits_g
                caches["full"] = main
                ttft["full"] = bare
                kv["full"] = 1.0
            for v in group:
                caches[v] = press_caches[v]
                ttft[v] = bare + spent[v]
                kv[v] = sum(press_caches[v].get_seq_length(i) for i in range(len(model.model.layers))) / total
        for v in self.presses:
            if is_decoding(v):  # a decoding press starts from the full model's cache: its own copy
                caches[v], ttft[v], kv[v] = copy.deepcopy(caches["full"]), ttft["full"], None
        self._prefill = _Prefill(key, logits, caches, ttft, kv)
        return self._prefill

    # -- the backend call --
    def generate(self, model, variant, input_ids, max_new_tokens, eos, stop=None, keep_logprobs=0):
        slot = "full" if variant.method == "full" else variant
        pre = self._prefill_for(model, slot, input_ids)
        cache = pre.caches.pop(slot)
        length = input_ids.shape[1]

        def prefill():
            return pre.logits

        def step(token, i):
            position = torch.tensor([[length + i]], dtype=torch.long)
            out = model(input_ids=token, past_key_values=cache, position_ids=position, use_cache=True)
            return out.logits

        press = self.presses[variant] if slot != "full" and is_decoding(variant) else None
        start = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            decoded = greedy_decode(prefill, step, max_new_tokens, eos, stop, keep_logprobs)
        decode_s = time.perf_counter() - start
        decoded.ttft_s = pre.ttft[slot]
        decoded.total_s = pre.ttft[slot] + decode_s
        decoded.compute_share = 1.0
        layers = len(model.model.layers)
        # a decoding press: the share of all tokens seen that the cache holds at the end
        decoded.kv_share = pre.kv[slot] if press is None else \
            sum(cache.get_seq_length(i) for i in range(layers)) / (layers * (length + len(decoded.tokens)))
        decoded.info = {"timing": "separate prefill" if self.separate else "shared prefill + own compression time"}
        return decoded


def compression_levels(args) -> list[float]:
    if args.compression:
        levels = [float(x) for x in args.compression.split(",") if x.strip()]
    elif args.match:
        data = json.loads(Path(args.match).read_text())
        levels = []
        for row in data.get("results", []):
            if row.get("task") == "average" and row.get("method") == "lazy" and row.get("kv") is not None:
                levels.append(round(1.0 - float(row["kv"]), 3))
        if not levels:
            raise SystemExit(f"{args.match} has no finished 'lazy' average rows to match")
    else:
        raise SystemExit("give --compression 0.59,0.40 or --match <trimformer results JSON>")
    bad = [r for r in levels if not 0.0 <= r < 1.0]
    if bad:
        raise SystemExit(f"compression ratios must be in [0, 1), got {bad}")
    return sorted(set(levels), reverse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["longbench", "needle", "fidelity"])
    p.add_argument("--model", default="smollm2-135m", help="embedded name or local folder (default: %(default)s)")
    p.add_argument("--presses", default="snapkv,streamingllm,tova,knorm",
                   help=f"comma-separated, of {', '.join(PRESSES)}, or decoding-<press> for kvpress's "
                        "decoding press around that scorer (default: %(default)s)")
    p.add_argument("--compression", default=None, help="KV compression ratios, e.g. 0.59,0.40")
    p.add_argument("--match", default=None, help="take the ratios from a trimformer results JSON: 1 - the KV share "
                                                 "kept by each of its 'lazy' variants (its average rows)")
    p.add_argument("--separate", action="store_true", help="one prefill per press (TTFT measured end to end)")
    p.add_argument("--data", default=None)
    p.add_argument("--tasks", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--chat", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    p.add_argument("--tokens", type=int, default=32, help="fidelity: greedy tokens compared")
    p.add_argument("--json", required=True, help="results file (resumed when it exists)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import transformers

    import kvpress  # noqa: F401
    from trimformer.loading import load_model
    from trimformer_lab.evaluation import tasks as ev
    from trimformer_lab.evaluation.report import format_table
    from trimformer_lab.evaluation.variants import Variant

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = compression_levels(args)
    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    presses = {Variant(name, round(1.0 - r, 4), backend="kvpress"): make_press(name, r)
               for r in levels for name in names}
    model, tokenizer = load_model(args.model)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    settings = ev.model_settings(args.model)
    if args.task == "needle":
        items = ev.needle_items(tokenizer, [int(x) for x in args.lengths.split(",")],
                                [float(x) for x in args.depths.split(",")], args.limit, args.data, tasks)
    elif args.task == "longbench":
        items = ev.longbench_items(tokenizer, args.data, tasks, args.limit, args.budget, args.chat, args.max_new_tokens)
        settings.update(budget=args.budget, chat=args.chat, max_new_tokens=args.max_new_tokens)
    else:
        items = ev.fidelity_items(tokenizer, args.data, tasks, args.limit, args.budget, args.chat)
        settings.update(budget=args.budget, chat=args.chat, tokens=args.tokens)
    print(f"[kvpress_compare] transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); presses {names} at compression {levels}", file=sys.stderr)
    data = ev.run_evaluation(args.task, model, tokenizer, list(presses), items, json_path=args.json,
                             settings=settings, backend=KVPressBackend(presses, args.separate),
                             progress=not args.no_progress, fidelity_tokens=args.tokens,
                             log=lambda m: print(m, file=sys.stderr))
    print(format_table(data.get("full", []) + data["results"], fidelity=args.task == "fidelity"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

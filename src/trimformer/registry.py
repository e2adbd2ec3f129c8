"""What trimformer can do, in one place: the scorers, the mechanisms, and the method names that are
sugar for a scorer plus mechanisms.

A *scorer* (one file each in `scorers/`) gives every live token an importance. A *mechanism* acts on
tokens: ``prune`` drops prompt tokens during prefill (their hidden states wait in an aux cache that
decoding can revive them from), ``evict`` moves KV entries to a shadow set while decoding (and readmits
them), ``merge`` merges similar tokens (ToMe). Adaptive counts (``adaptive=True``) are an option of
prune and merge. A method name picks a scorer and mechanisms; any registered scorer's name is a method
too (prefill dropping scored by it), and ``"<method>+runtime"`` adds decode-time eviction to a method
that prunes the prompt. Adapters, the CLI and the Pruna integration read this module; none keeps a list
of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .scorers import SCORERS, Scorer

__all__ = ["MECHANISMS", "METHODS", "SCORERS", "Method", "get_method", "method_names", "methods_for", "resolve"]

# mechanism -> the kinds of model it runs on (matched against an adapter's `kind`)
MECHANISMS: dict[str, frozenset[str]] = {
    "prune": frozenset({"decoder", "encoder", "seq2seq"}),
    "evict": frozenset({"decoder"}),
    "merge": frozenset({"encoder", "diffusion"}),
}
RUNTIME_SUFFIX = "+runtime"


@dataclass(frozen=True)
class Method:
    """A scorer plus the mechanisms that act on its scores, with the defaults they take together."""

    name: str
    description: str
    scorer: str | None              # a key of SCORERS; None where the mechanism scores on its own
    mechanisms: frozenset[str]      # keys of MECHANISMS
    revive_default: bool = False    # prune: bring tokens back while decoding unless `revive` says otherwise
    paper: str = ""

    @property
    def scorer_class(self) -> type[Scorer] | None:
        return SCORERS[self.scorer] if self.scorer is not None else None

    @property
    def prunes_prefill(self) -> bool:
        return "prune" in self.mechanisms

    @property
    def evicts(self) -> bool:
        return "evict" in self.mechanisms

    @property
    def merges(self) -> bool:
        return "merge" in self.mechanisms

    def needs(self, what: str) -> bool:
        """Whether the scorer declared `what` (see `scorers.base.NEEDS`)."""
        return self.scorer is not None and what in self.scorer_class.needs

    @property
    def needs_attention(self) -> bool:
        return self.needs("attention")

    @property
    def span_pool(self) -> bool:
        return self.scorer is not None and self.scorer_class.smooth

    @property
    def applies_to(self) -> frozenset[str]:
        """The model kinds every part of this method runs on."""
        kinds = frozenset.intersection(*(MECHANISMS[m] for m in self.mechanisms))
        return kinds & self.scorer_class.applies_to if self.scorer is not None else kinds

    def build_scorer(self, config: Any, model: torch.nn.Module, plan: dict[int, float]) -> Scorer | None:
        return self.scorer_class.build(config, model, plan) if self.scorer is not None else None


METHODS: dict[str, Method] = {}


def _method(name: str, description: str, scorer: str | None, *mechanisms: str, **defaults: Any) -> None:
    METHODS[name] = Method(name, description, scorer, frozenset(mechanisms), **defaults)


_method("lazy", "LazyLLM: attention of the last queries, progressive per layer, aux cache with revival",
        "last_query", "prune", revive_default=True, paper="LazyLLM (Fu et al., 2024)")
_method("random", "baseline: the same schedule with a random choice of tokens", "random", "prune")
_method("static", "baseline: attention sinks plus the most recent tokens (StreamingLLM-like)", "recency", "prune",
        paper="StreamingLLM (Xiao et al., 2023)")
_method("truncate", "baseline: keep the head and the tail of the prompt", "head_tail", "prune")
_method("sdtp", "SDTP: a learned MLP per stage predicts token saliency from the hidden state (pruner=PATH)",
        "sdtp", "prune", revive_default=True, paper="SDTP (Tao et al., 2025)")
_method("tome", "ToMe: bipartite soft matching merges r similar tokens per layer (encoders; adaptive=True: ATS "
        "decides per input how many); on diffusion models each block merges a share of its latent tokens and "
        "unmerges its output (ToMe for Stable Diffusion)", None, "merge",
        paper="ToMe (Bolya et al., 2023); ATS (Fayyaz et al., 2022); ToMeSD (Bolya & Hoffman, 2023)")
_method("runtime", "decode-time KV eviction by accumulated attention, with a shadow set that readmits tokens",
        None, "evict", paper="H2O-style heavy hitters with a shadow set")


# every scorer no method above names is a method of its own: prefill dropping scored by it
for _name, _scorer in SCORERS.items():
    if _name not in METHODS and all(m.scorer != _name for m in METHODS.values()):
        _method(_name, _scorer.description, _name, "prune", paper=_scorer.paper)


def method_names() -> list[str]:
    """Every name `trim(method=...)` accepts, besides ``"<method>+runtime"`` (and scorers registered later,
    which `get_method` finds too)."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """A method by name: a registered method, a scorer's name (prefill dropping scored by it), or
    ``"<method>+runtime"``: prefill pruning, then decode-time eviction (the prefill method's own revival is
    then off; the shadow set brings tokens back instead)."""
    if isinstance(name, str) and name.endswith(RUNTIME_SUFFIX) and name != "runtime":
        prefill = get_method(name[: -len(RUNTIME_SUFFIX)])
        if not prefill.prunes_prefill:
            raise ConfigError(f"{prefill.name!r} does not prune the prompt, so it cannot come before +runtime")
        return dataclasses.replace(prefill, name=name, mechanisms=prefill.mechanisms | {"evict"},
                                   revive_default=False)
    if name in METHODS:
        return METHODS[name]
    if name in SCORERS:                        # a scorer registered after this module was imported
        scorer = SCORERS[name]
        return Method(name, scorer.description, name, frozenset({"prune"}), paper=scorer.paper)
    raise ConfigError(f"unknown method {name!r}; accepted: {', '.join(method_names())}, or '<method>+runtime'")


def resolve(config: Any) -> Method:
    """The method a validated `TrimConfig` asks for: its `method`, with `scorer` and `mechanisms` overriding
    the method's own when given."""
    method = get_method(config.method)
    if config.scorer is not None:
        if "prune" not in (config.mechanisms or method.mechanisms):
            raise ConfigError(f"scorer= chooses what prefill dropping (prune) scores by; {method.name!r} does not "
                              "prune (eviction scores by accumulated attention, merging by similarity)")
        if config.scorer not in SCORERS:
            raise ConfigError(f"unknown scorer {config.scorer!r}; accepted: {', '.join(sorted(SCORERS))}")
        method = dataclasses.replace(method, scorer=config.scorer)
    if config.mechanisms is not None:
        unknown = sorted(set(config.mechanisms) - set(MECHANISMS))
        if unknown or not config.mechanisms:
            raise ConfigError(f"mechanisms must be a non-empty list among {sorted(MECHANISMS)}, got "
                              f"{list(config.mechanisms)!r}")
        mechanisms = frozenset(config.mechanisms)
        # with eviction the shadow set brings tokens back: prefill revival is off (as with "+runtime")
        revive = method.revive_default and "evict" not in mechanisms
        method = dataclasses.replace(method, mechanisms=mechanisms, revive_default=revive)
    if method.merges and len(method.mechanisms) > 1:
        raise ConfigError("merge cannot be combined with prune or evict: merging changes the token layout "
                          "that the other mechanisms track")
    if method.prunes_prefill and method.scorer is None:
        raise ConfigError(f"{method.name!r} prunes the prompt but names no scorer; give scorer=NAME "
                          f"({', '.join(sorted(SCORERS))})")
    if method.scorer is not None and not method.applies_to:
        kinds = sorted(SCORERS[method.scorer].applies_to)
        raise ConfigError(f"scorer {method.scorer!r} runs on {kinds} models and mechanisms "
                          f"{sorted(method.mechanisms)} on others: no model kind has both")
    return method


def methods_for(kind: str) -> list[str]:
    """The method names that run on models of `kind` ("decoder", "encoder", "seq2seq", "diffusion")."""
    return [name for name in method_names() if kind in get_method(name).applies_to]

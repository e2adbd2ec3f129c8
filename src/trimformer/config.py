"""`TrimConfig`: what to trim, where and how, in option groups per mechanism, validated in one place.

``TrimConfig(method="lazy", prune={"layers": [7, 14]}, evict={"budget": 0.5})`` is the full form; every
option also has a flat keyword (``trim(model, method="lazy", keep=0.5, budget=0.5)``) and the token
optimizer's dict works too (``{"method": "tome", "reduction_ratio": 0.3, "adaptive": True}``). Options of
a mechanism the method does not use are ignored. Errors name the option and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

POOLS = ("max", "mean")
DEFAULT_KEEP = 0.5
SHADOW_DTYPES = ("bfloat16", "float16", "float32")
R_SCHEDULES = ("constant", "decreasing", "increasing")
MERGE_METRICS = ("auto", "keys", "hidden")
TOME_MODES = ("merge", "merge_unmerge")
UNMERGE_ATTENTION = ("qkv", "queries", "keys_values", "none")
ADAPTIVE_MODES = ("sampling", "mass", "similarity")


@dataclass
class PruneOptions:
    """Prefill dropping: where to drop, how the attention scorer looks, and revival from the aux cache.

    Tokens are dropped *after* the layers in `layers` (or the keys of `schedule`); each stage keeps the
    share `keep` (a top-level option) of the tokens still live. With neither given, a model with a measured
    preset (`presets.py`) uses it; any other prunes after 20%, 40%, 60% and 80% of its depth.
    """

    layers: tuple[int, ...] | None = None     # prune after these layers (0-based); None = default stages
    schedule: dict[int, float] | None = None  # explicit {layer: keep}; overrides `layers` and `keep`
    window: int = 64                          # last queries whose attention scores the prompt
    pool: str = "max"                         # pool attention over heads and window queries: max or mean
    span: int = 33                            # max-pool scores over this many neighbouring tokens (1 = off)
    revive: bool | None = None                # bring pruned tokens back while decoding (None: the method decides)
    revive_every: int = 1                     # decoding steps between revival checks
    revive_threshold: float = 10.0            # revive a token whose attention is >= this x uniform
    revive_max: int = 16                      # at most this many revivals per stage, row and step

    def validate(self) -> None:
        if self.schedule is not None:
            if not isinstance(self.schedule, dict) or not self.schedule:
                raise ConfigError("schedule must be a non-empty dict {layer_index: keep_ratio}")
            for layer, ratio in self.schedule.items():
                _layer(layer)
                _ratio(f"schedule[{layer}]", ratio)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)):
                raise ConfigError(f"layers must be a list of layer indices, got {self.layers!r}")
            for layer in self.layers:
                _layer(layer)
        _positive_int("window", self.window)
        _positive_int("span", self.span)
        if self.span % 2 == 0:
            raise ConfigError(f"span must be odd (centred on the token), got {self.span}")
        _positive_int("revive_every", self.revive_every)
        _count("revive_max", self.revive_max)
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.revive is not None and not isinstance(self.revive, bool):
            raise ConfigError(f"revive must be True, False or None (the method decides), got {self.revive!r}")
        if not isinstance(self.revive_threshold, (int, float)) or self.revive_threshold < 0:
            raise ConfigError(f"revive_threshold must be a number >= 0, got {self.revive_threshold!r}")


@dataclass
class EvictOptions:
    """Decode-time KV eviction (method "runtime", or "<prefill method>+runtime") with a shadow set."""

    budget: float | int | None = None       # KV kept per layer: share of tokens seen (<= 1.0) or a count (int)
    pruning_threshold: float = 0.0          # also evict tokens whose accumulated attention < this x uniform
    decay: float = 0.9                      # accumulated attention = decay x old + new (heavy hitters)
    recent: int = 32                        # newest tokens never evicted
    score_every: int = 4                    # decoding steps between attention accumulations
    evict_every: int = 8                    # decoding steps between evictions
    readmit_every: int = 1                  # decoding steps between shadow-set checks (0 = never readmit)
    readmit_threshold: float = 3.0          # readmit a shadow token whose attention is >= this x uniform
    readmit_max: int = 32                   # at most this many readmissions per layer, row and check
    readmit_layers: tuple[int, ...] | str | None = "auto"  # the layers that check their shadow sets; a token
                                            # one of them readmits comes back in every layer whose shadow set
                                            # holds it. "auto": 3 layers, at 1/6, 1/2 and 5/6 of the depth;
                                            # None: every layer checks its own shadow set
    shadow_size: int | None = None          # evicted tokens kept per layer and row (None = all)
    shadow_device: str | None = None        # e.g. "cpu" to keep the shadow set off the accelerator
    shadow_dtype: str | None = None         # e.g. "bfloat16" to keep it in lower precision

    def validate(self) -> None:
        if self.budget is not None:
            if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or self.budget <= 0 or (
                isinstance(self.budget, float) and self.budget > 1.0
            ):
                raise ConfigError(
                    f"budget must be a share of the tokens in (0, 1.0] (a float) or a token count >= 1 "
                    f"(an int), got {self.budget!r}"
                )
        for name in ("pruning_threshold", "readmit_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0 (a multiple of uniform attention), got {value!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"decay must be in [0, 1], got {self.decay!r}")
        for name in ("score_every", "evict_every"):
            _positive_int(name, getattr(self, name))
        for name in ("recent", "readmit_every", "readmit_max"):
            _count(name, getattr(self, name))
        if self.readmit_layers is not None and self.readmit_layers != "auto":
            if not isinstance(self.readmit_layers, (list, tuple)) or not self.readmit_layers:
                raise ConfigError(f"readmit_layers must be \"auto\", None (every layer) or a non-empty list of "
                                  f"layer indices, got {self.readmit_layers!r}")
            for layer in self.readmit_layers:
                _layer(layer)
        if self.shadow_size is not None and (not isinstance(self.shadow_size, int) or self.shadow_size < 0):
            raise ConfigError(f"shadow_size must be None (unbounded) or an integer >= 0, got {self.shadow_size!r}")
        if self.shadow_dtype is not None and self.shadow_dtype not in SHADOW_DTYPES:
            raise ConfigError(f"shadow_dtype must be one of {sorted(SHADOW_DTYPES)} or None, got {self.shadow_dtype!r}")


@dataclass
class MergeOptions:
    """Token merging (method "tome") in encoders."""

    r: int | list[int] | None = None        # tokens merged per layer (int) or per-layer list; None: from keep
    r_schedule: str = "constant"            # for an int r: "constant", "decreasing" (2r -> 0), "increasing"
    prop_attn: bool = True                  # proportional attention: log(size) added to the attention logits
    merge_metric: str = "auto"              # similarity: "keys" (head-mean, ToMe), "hidden" (the merged
                                            # states), "auto": hidden on text encoders, keys on images
    trace_source: bool = False              # record which input tokens each slot holds, per layer
    tome_mode: str = "merge"                # BERT family: "merge" (merged tokens stay merged) or "merge_unmerge"
                                            # (ToMe for Stable Diffusion: merge per block for the computation
                                            # only, unmerge its output, the residual keeps every token)
    unmerge_attention: str = "qkv"          # merge_unmerge: what the attention block computes on merged tokens:
                                            # "qkv", "queries" (keys/values on all), "keys_values", "none"
    unmerge_mlp: bool = True                # merge_unmerge: the MLP runs on merged tokens

    def validate(self) -> None:
        if self.r is not None:
            values = list(self.r) if isinstance(self.r, (list, tuple)) else [self.r]
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise ConfigError(f"r must be an integer >= 0 or a non-empty list of them, got {self.r!r}")
        if self.r_schedule not in R_SCHEDULES:
            raise ConfigError(f"r_schedule must be one of {R_SCHEDULES}, got {self.r_schedule!r}")
        for name in ("prop_attn", "trace_source", "unmerge_mlp"):
            _bool(name, getattr(self, name))
        if self.merge_metric not in MERGE_METRICS:
            raise ConfigError(f"merge_metric must be 'auto', 'keys' or 'hidden', got {self.merge_metric!r}")
        if self.tome_mode not in TOME_MODES:
            raise ConfigError(f"tome_mode must be one of {TOME_MODES}, got {self.tome_mode!r}")
        if self.unmerge_attention not in UNMERGE_ATTENTION:
            raise ConfigError(f"unmerge_attention must be one of {UNMERGE_ATTENTION}, got {self.unmerge_attention!r}")
        if self.tome_mode == "merge_unmerge" and self.unmerge_attention == "none" and not self.unmerge_mlp:
            raise ConfigError("tome_mode 'merge_unmerge' with unmerge_attention='none' and unmerge_mlp=False merges "
                              "nothing: merge the attention block, the MLP or both")


@dataclass
class AdaptiveOptions:
    """Adaptive counts: how many tokens to keep decided per input instead of by a fixed ratio."""

    enabled: bool = False       # flat option `adaptive`
    mass: float = 0.9           # prune, "mass" mode: keep the smallest set holding this share of the scores
    mode: str = "sampling"      # flat `adaptive_mode`; encoders: "sampling" (ATS), "mass" or, for tome,
                                # "similarity" (merge every pair at least merge_threshold alike)
    merge_threshold: float = 0.65   # mode "similarity": cosine a matched pair needs to merge

    def validate(self) -> None:
        _bool("adaptive", self.enabled)
        _ratio("mass", self.mass)
        if self.mode not in ADAPTIVE_MODES:
            raise ConfigError(f"adaptive_mode must be 'sampling', 'mass' or 'similarity', got {self.mode!r}")
        if isinstance(self.merge_threshold, bool) or not isinstance(self.merge_threshold, (int, float)) or not (
                -1.0 <= self.merge_threshold <= 1.0):
            raise ConfigError(f"merge_threshold is a cosine similarity in [-1, 1], got {self.merge_threshold!r}")


GROUPS: dict[str, type] = {"prune": PruneOptions, "evict": EvictOptions, "merge": MergeOptions,
                           "adaptive": AdaptiveOptions}
# flat keyword -> (group, field); a group's own field names are flat keywords unless renamed here
RENAMED = {"adaptive": ("adaptive", "enabled"), "adaptive_mode": ("adaptive", "mode"), "mass": ("adaptive", "mass"),
           "merge_threshold": ("adaptive", "merge_threshold")}
FLAT: dict[str, tuple[str, str]] = {
    **{f.name: (group, f.name) for group, cls in GROUPS.items() if group != "adaptive" for f in dataclasses.fields(cls)},
    **RENAMED,
}


@dataclass(init=False)
class TrimConfig:
    """Options of a trim. Every option has a default; give a few as keywords, flat or in their group."""

    method: str = "lazy"                    # a method name (`trimformer methods`), a scorer's, or "<m>+runtime"
    scorer: str | None = None               # override the method's scorer (prefill dropping)
    mechanisms: tuple[str, ...] | None = None  # override the method's mechanisms: among prune, evict, merge
    keep: float | None = None               # share of live tokens kept at each stage (prune) / overall (merge)
    sinks: int = 4                          # first tokens of each row, never dropped or evicted
    protect_last: int = 16                  # last prompt tokens of each row, never dropped (the query, template)
    seed: int = 0                           # for the random scorer and ToMe's random destinations
    pruner: str | None = None               # a learned pruner (methods "sdtp", "tsdtp"); None: the shipped one
    cls_only_last: bool = False             # encoders read through [CLS]: the last layer's MLP runs on [CLS] only
    prune: PruneOptions = field(default_factory=PruneOptions)
    evict: EvictOptions = field(default_factory=EvictOptions)
    merge: MergeOptions = field(default_factory=MergeOptions)
    adaptive: AdaptiveOptions = field(default_factory=AdaptiveOptions)

    def __init__(self, method: str = "lazy", **options: Any) -> None:
        top = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - set(top) - set(FLAT) - {"reduction_ratio"})
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; accepted: {', '.join(accepted_names())}")
        if "reduction_ratio" in options:
            ratio = options.pop("reduction_ratio")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
                raise ConfigError(f"reduction_ratio must be a number in [0, 1), got {ratio!r}")
            if options.get("keep") is not None:
                raise ConfigError("give either reduction_ratio or keep, not both")
            options["keep"] = 1.0 - float(ratio)
        self.method = method
        groups = {name: _group(name, options.pop(name, None)) for name in GROUPS}
        for name, f in top.items():
            if name not in GROUPS and name != "method":
                setattr(self, name, options.pop(name, f.default))
        for name, value in options.items():                 # flat options of the groups
            group, attr = FLAT[name]
            setattr(groups[group], attr, value)
        for name, group in groups.items():
            setattr(self, name, group)
        if isinstance(self.prune.schedule, dict):             # JSON gives string keys: accept "7" for 7
            self.prune.schedule = {_int_key(k): v for k, v in self.prune.schedule.items()}
        for group, name in (("prune", "layers"), ("evict", "readmit_layers")):
            value = getattr(groups[group], name)
            if isinstance(value, list):
                setattr(groups[group], name, tuple(value))
        if isinstance(self.mechanisms, list):
            self.mechanisms = tuple(self.mechanisms)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> "TrimConfig":
        """Build from a dict (JSON, the CLI's --config, the token optimizer's form): flat keys, group dicts,
        and ``reduction_ratio`` (keep = 1 - reduction_ratio)."""
        return cls(**dict(options))

    @classmethod
    def coerce(cls, config: "TrimConfig | dict | str | None", options: dict[str, Any]) -> "TrimConfig":
        """Turn what `trim` was given (config object, dict, method name, keyword options) into a config."""
        if isinstance(config, TrimConfig):
            return config.replace(**options) if options else config
        if isinstance(config, dict):
            return cls.from_dict({**config, **options})
        if isinstance(config, str):
            return cls.from_dict({"method": config, **options})
        if config is None:
            return cls.from_dict(options)
        raise ConfigError(f"trim() takes a TrimConfig, a dict or a method name, got {type(config).__name__}")

    def replace(self, **options: Any) -> "TrimConfig":
        """A copy with `options` (flat or group keywords) changed."""
        return TrimConfig(**{**self.to_dict(), **options})

    def to_dict(self) -> dict[str, Any]:
        """Every option, groups as dicts (JSON-ready: `TrimConfig(**cfg.to_dict())` gives it back)."""
        return dataclasses.asdict(self)

    def __getattr__(self, name: str) -> Any:
        """Flat reads (`config.budget`) of grouped options."""
        if name in FLAT and "prune" in self.__dict__:
            group, attr = FLAT[name]
            return getattr(self.__dict__[group], attr)
        raise AttributeError(f"{type(self).__name__} has no option {name!r}")

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every option; raise `ConfigError` naming the option and what is accepted."""
        if not isinstance(self.method, str):
            raise ConfigError(f"method must be a name (see `trimformer methods`), got {self.method!r}")
        if self.keep is not None:
            _ratio("keep", self.keep)
        for name in ("sinks", "protect_last"):
            _count(name, getattr(self, name))
        if self.protect_last < 1:
            raise ConfigError("protect_last must be >= 1: the token being predicted is never pruned")
        _bool("cls_only_last", self.cls_only_last)
        for name, cls in GROUPS.items():
            group = getattr(self, name)
            if not isinstance(group, cls):
                raise ConfigError(f"{name} must be a {cls.__name__} or a dict of its options, got {group!r}")
            group.validate()
        if self.merge.r is not None and self.keep is not None:
            raise ConfigError("give either r (tokens merged per layer) or keep / reduction_ratio, not both")

    def resolve_schedule(self, num_layers: int, preset: dict[int, float] | None = None) -> dict[int, float]:
        """The {layer: keep} plan for a model with `num_layers` layers (validated against it).
        `preset` is the model's measured default schedule, if it has one."""
        self.validate()
        prune = self.prune
        if prune.schedule is not None:
            plan = {int(k): float(v) for k, v in prune.schedule.items()}
        elif prune.layers is None and preset is not None:
            plan = {layer: float(self.keep if self.keep is not None else ratio) for layer, ratio in preset.items()}
        else:
            layers = prune.layers if prune.layers is not None else default_layers(num_layers)
            keep = self.keep if self.keep is not None else DEFAULT_KEEP
            plan = {int(layer): float(keep) for layer in layers}
        bad = sorted(layer for layer in plan if layer > num_layers - 2)
        if bad:
            raise ConfigError(
                f"schedule names layer(s) {bad}, but this model has {num_layers} layers: "
                f"prune after layers 0..{num_layers - 2} (pruning after the last layer saves nothing)"
            )
        return dict(sorted(plan.items()))


def accepted_names() -> list[str]:
    """Every option name `TrimConfig` and `trim` accept (flat and group names)."""
    top = [f.name for f in dataclasses.fields(TrimConfig)]
    return sorted(set(top) | set(FLAT) | {"reduction_ratio"})


def _group(name: str, value: Any) -> Any:
    cls = GROUPS[name]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return dataclasses.replace(value)
    if name == "adaptive" and isinstance(value, bool):
        return cls(enabled=value)
    if isinstance(value, dict):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ConfigError(f"unknown {name} option(s) {unknown}; accepted: {', '.join(sorted(fields))}")
        if name == "adaptive":
            value = {"enabled": True, **value}
        return cls(**value)
    accepted = "True/False, " if name == "adaptive" else ""
    raise ConfigError(f"{name} must be {accepted}a dict of its options or a {cls.__name__}, got {value!r}")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Default stages: after 20%, 40%, 60% and 80% of the depth (layers 6, 12, 18, 24 of 30)."""
    stages = sorted({max(0, min(num_layers - 2, math.floor(num_layers * f))) for f in (0.2, 0.4, 0.6, 0.8)})
    return tuple(stages)


def _int_key(key: Any) -> Any:
    return int(key) if isinstance(key, str) and key.strip().isdigit() else key


def _ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a ratio in (0, 1], got {value!r}")


def _layer(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"layer indices must be integers >= 0, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")

"""The option groups of `TrimConfig`, one per mechanism, each validating its own options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .ops.merge import R_SCHEDULES

POOLS = ("max", "mean")
SHADOW_DTYPES = ("bfloat16", "float16", "float32")
MERGE_METRICS = ("auto", "keys", "hidden")
TOME_MODES = ("merge", "merge_unmerge")
UNMERGE_ATTENTION = ("qkv", "queries", "keys_values", "none")
ADAPTIVE_MODES = ("sampling", "mass", "similarity")
MERGE_PARTS = ("self_attention", "cross_attention", "mlp")
MAX_DOWNSAMPLE = (1, 2, 4, 8)


@dataclass
class PruneOptions:
    """Prefill dropping: where to drop, how the attention scorer looks, and revival from the aux cache.

    Tokens are dropped *after* the layers in `layers` (or the keys of `schedule`); each stage keeps the
    share `keep` (a top-level option) of the tokens still live. With neither given, the model's preset
    (`trimformer.presets`: a file given as `preset`, one calibrated into the cache folder, or a shipped one)
    is used; without one, pruning follows 20%, 40%, 60% and 80% of the depth.
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
                check_layer(layer)
                check_ratio(f"schedule[{layer}]", ratio)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)):
                raise ConfigError(f"layers must be a list of layer indices, got {self.layers!r}")
            for layer in self.layers:
                check_layer(layer)
        check_positive_int("window", self.window)
        check_positive_int("span", self.span)
        if self.span % 2 == 0:
            raise ConfigError(f"span must be odd (centred on the token), got {self.span}")
        check_positive_int("revive_every", self.revive_every)
        check_count("revive_max", self.revive_max)
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
            check_positive_int(name, getattr(self, name))
        for name in ("recent", "readmit_every", "readmit_max"):
            check_count(name, getattr(self, name))
        if self.readmit_layers is not None and self.readmit_layers != "auto":
            if not isinstance(self.readmit_layers, (list, tuple)) or not self.readmit_layers:
                raise ConfigError(f"readmit_layers must be \"auto\", None (every layer) or a non-empty list of "
                                  f"layer indices, got {self.readmit_layers!r}")
            for layer in self.readmit_layers:
                check_layer(layer)
        if self.shadow_size is not None and (not isinstance(self.shadow_size, int) or self.shadow_size < 0):
            raise ConfigError(f"shadow_size must be None (unbounded) or an integer >= 0, got {self.shadow_size!r}")
        if self.shadow_dtype is not None and self.shadow_dtype not in SHADOW_DTYPES:
            raise ConfigError(f"shadow_dtype must be one of {sorted(SHADOW_DTYPES)} or None, got {self.shadow_dtype!r}")


@dataclass
class MergeOptions:
    """Token merging (method "tome") in encoders and diffusion models."""

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
    # diffusion models (ToMe for Stable Diffusion; each block merges and unmerges, the share is keep /
    # reduction_ratio):
    merge_parts: tuple[str, ...] = ("self_attention",)  # the block parts that run on merged tokens, among
                                            # "self_attention", "cross_attention" (its queries) and "mlp"
    max_downsample: int = 1                 # merge in blocks whose token grid is at most this many times
                                            # coarser than the finest (1: the highest resolution only)
    stride: int = 2                         # one destination token per stride x stride cell of the grid
    random_destinations: bool = True        # the destination's place in its cell drawn per step (seeded)

    def validate(self) -> None:
        if self.r is not None:
            values = list(self.r) if isinstance(self.r, (list, tuple)) else [self.r]
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise ConfigError(f"r must be an integer >= 0 or a non-empty list of them, got {self.r!r}")
        if self.r_schedule not in R_SCHEDULES:
            raise ConfigError(f"r_schedule must be one of {R_SCHEDULES}, got {self.r_schedule!r}")
        for name in ("prop_attn", "trace_source", "unmerge_mlp", "random_destinations"):
            check_bool(name, getattr(self, name))
        parts = (self.merge_parts,) if isinstance(self.merge_parts, str) else self.merge_parts
        if not isinstance(parts, (list, tuple)) or not parts or any(p not in MERGE_PARTS for p in parts) \
                or len(set(parts)) != len(parts):
            raise ConfigError(f"merge_parts must be a non-empty list of distinct parts among {MERGE_PARTS}, "
                              f"got {self.merge_parts!r}")
        self.merge_parts = tuple(parts)
        if isinstance(self.max_downsample, bool) or self.max_downsample not in MAX_DOWNSAMPLE:
            raise ConfigError(f"max_downsample must be one of {MAX_DOWNSAMPLE}, got {self.max_downsample!r}")
        check_positive_int("stride", self.stride)
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

    def __bool__(self) -> bool:
        """`if config.adaptive:` reads as the flat option did."""
        return self.enabled

    def validate(self) -> None:
        check_bool("adaptive", self.enabled)
        check_ratio("mass", self.mass)
        if self.mode not in ADAPTIVE_MODES:
            raise ConfigError(f"adaptive_mode must be 'sampling', 'mass' or 'similarity', got {self.mode!r}")
        if isinstance(self.merge_threshold, bool) or not isinstance(self.merge_threshold, (int, float)) or not (
                -1.0 <= self.merge_threshold <= 1.0):
            raise ConfigError(f"merge_threshold is a cosine similarity in [-1, 1], got {self.merge_threshold!r}")


def check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a ratio in (0, 1], got {value!r}")


def check_layer(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"layer indices must be integers >= 0, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")

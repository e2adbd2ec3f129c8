"""`TrimConfig`: what to trim, where and how, in option groups per mechanism (`options.py`); `validate`
checks every option, and the registry checks that method, scorer and mechanisms fit together.

``TrimConfig(method="lazy", prune={"layers": [7, 14]}, evict={"budget": 0.5})`` is the full form; every
option also has a flat keyword (``trim(model, method="lazy", keep=0.5, budget=0.5)``) and the token
optimizer's dict works too (``{"method": "tome", "reduction_ratio": 0.3, "adaptive": True}``). Options of
a mechanism the method does not use are ignored. Errors name the option and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .options import (AdaptiveOptions, EvictOptions, MergeOptions, PruneOptions, check_bool, check_count,
                      check_layer, check_positive_int, check_ratio)

DEFAULT_KEEP = 0.5


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
    preset: str | None = None               # a preset JSON file (docs/calibration.md); None: found by fingerprint
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
        if isinstance(self.mechanisms, (list, str)):
            self.mechanisms = (self.mechanisms,) if isinstance(self.mechanisms, str) else tuple(self.mechanisms)
        if isinstance(self.preset, os.PathLike):            # a Path is kept as its string (JSON-ready)
            self.preset = os.fspath(self.preset)

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
        """A copy with `options` changed: flat keywords, or group dicts merged into the groups they name
        (``replace(prune={"span": 3})`` keeps the other prune options)."""
        merged = self.to_dict()
        for name, value in options.items():
            if name in GROUPS and isinstance(value, dict):
                merged[name] = {**merged[name], **value}
            elif name == "adaptive" and isinstance(value, bool):
                merged[name] = {**merged[name], "enabled": value}
            else:
                merged[name] = value
        return TrimConfig(**merged)

    def to_dict(self) -> dict[str, Any]:
        """Every option, groups as dicts (JSON-ready: `TrimConfig(**cfg.to_dict())` gives it back)."""
        return dataclasses.asdict(self)

    def __getattr__(self, name: str) -> Any:
        """Flat reads (`config.budget`) of grouped options."""
        if name in FLAT and "prune" in self.__dict__:
            group, attr = FLAT[name]
            return getattr(self.__dict__[group], attr)
        raise AttributeError(f"{type(self).__name__} has no option {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """Flat writes (`config.budget = 0.5`, `config.adaptive = True`) go to the option's group."""
        grouped = name in FLAT and name not in GROUPS or (name == "adaptive" and isinstance(value, bool))
        if grouped and "adaptive" in self.__dict__:
            group, attr = FLAT[name]
            setattr(self.__dict__[group], attr, value)
        else:
            object.__setattr__(self, name, value)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every option; raise `ConfigError` naming the option and what is accepted."""
        if not isinstance(self.method, str):
            raise ConfigError(f"method must be a name (see `trimformer methods`), got {self.method!r}")
        if self.scorer is not None and not isinstance(self.scorer, str):
            raise ConfigError(f"scorer must be a scorer's name (see `trimformer methods`), got {self.scorer!r}")
        if self.mechanisms is not None and (not isinstance(self.mechanisms, tuple)
                                            or not all(isinstance(m, str) for m in self.mechanisms)):
            raise ConfigError(f"mechanisms must be a list of names among prune, evict, merge, got {self.mechanisms!r}")
        if self.keep is not None:
            check_ratio("keep", self.keep)
        for name in ("sinks", "protect_last"):
            check_count(name, getattr(self, name))
        if self.protect_last < 1:
            raise ConfigError("protect_last must be >= 1: the token being predicted is never pruned")
        check_bool("cls_only_last", self.cls_only_last)
        if self.preset is not None:
            if not isinstance(self.preset, str) or not self.preset:
                raise ConfigError(f"preset must be the path of a preset JSON file (or None: the model's preset is "
                                  f"found by its fingerprint), got {self.preset!r}")
            if not os.path.isfile(self.preset):
                raise ConfigError(f"preset file {self.preset} does not exist; give the path of a file written by "
                                  f"`trimformer calibrate schedule` or `trimformer tune`")
        for name, cls in GROUPS.items():
            group = getattr(self, name)
            if not isinstance(group, cls):
                raise ConfigError(f"{name} must be a {cls.__name__} or a dict of its options, got {group!r}")
            group.validate()
        if self.merge.r is not None and self.keep is not None:
            raise ConfigError("give either r (tokens merged per layer) or keep / reduction_ratio, not both")

    def resolve_schedule(self, num_layers: int, preset: dict[int, float] | None = None) -> dict[int, float]:
        """The {layer: keep} plan for a model with `num_layers` layers (validated against it).
        `preset` is the model's measured default schedule, if it has one (`presets.preset_for`, which reads
        the file of the ``preset`` option first); an explicit `schedule` or `layers` wins over it."""
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

"""Variants: the ways an evaluation runs the model (the full model, a trimformer method at a keep level
with options, or a peer's method), parsed from the command line's "lazy,random" and "default,0.7"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from trimformer.config import TrimConfig
from trimformer.errors import InputError
from trimformer.registry import resolve

FULL = "full"


@dataclass(frozen=True)
class Variant:
    """A way to run the model. `keep` None means the method's default schedule (TrimConfig defaults)."""

    method: str
    keep: float | None = None
    options: tuple[tuple[str, Any], ...] = ()
    backend: str = "trimformer"

    @property
    def label(self) -> str:
        if self.method == FULL:
            return FULL
        keep = "default" if self.keep is None else f"{self.keep:g}"
        extra = "".join(f",{k}={_text(v)}" for k, v in self.options)
        return f"{self.method}@{keep}{extra}"

    def trim_config(self) -> TrimConfig:
        options = {k: _thaw(v) for k, v in self.options}
        if self.keep is not None:
            options["keep"] = self.keep
        return TrimConfig.from_dict({"method": self.method, **options})


def parse_variants(methods: str | Sequence[str], keeps: str | Sequence[str] | None = None,
                   options: dict[str, Any] | None = None) -> list[Variant]:
    """Variants from "lazy,random" and "default,0.7" (cross product). A method may carry its own keep,
    "lazy@0.7" or "random@default", which then ignores `keeps`. "full" is always run and needs no entry."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if keeps is None or keeps == "":
        keep_list: list[float | None] = [None]
    else:
        raw = [k.strip() for k in keeps.split(",")] if isinstance(keeps, str) else list(keeps)
        keep_list = [_keep(k) for k in raw]
    opts = tuple(sorted((k, _freeze(v)) for k, v in (options or {}).items()))
    variants: list[Variant] = []
    for name in names:
        if not name:
            continue
        if "@" in name:
            method, keep = name.split("@", 1)
            candidates = [Variant(method, _keep(keep), opts)]
        else:
            candidates = [Variant(name, k, opts) for k in keep_list]
        for v in candidates:
            if v.method == FULL:
                continue
            if v not in variants:
                variants.append(v)
    if not variants:
        raise InputError("no method to evaluate: pass --method lazy (or several: lazy,random,static,truncate)")
    for v in variants:
        v.trim_config()  # validate now: a clear error before any model is loaded
        resolve(v.trim_config())
    return variants


class _FrozenDict(tuple):
    """A dict option value as a hashable tuple of (key, value) pairs."""


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (a Variant is a dict key): dicts become
    `_FrozenDict`s, lists become tuples."""
    if isinstance(value, dict):
        return _FrozenDict((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The option value `_freeze` stood in for (tuples come back as lists)."""
    if isinstance(value, _FrozenDict):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _text(value: Any) -> str:
    """An option value as it appears in a label: {4:0.5,8:0.7}, [7,14], 0.5."""
    value = _thaw(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def _keep(text: Any) -> float | None:
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "default", "none")):
        return None
    try:
        value = float(text)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a keep level is a ratio in (0, 1] or 'default', got {text!r}") from exc
    if not 0.0 < value <= 1.0:
        raise InputError(f"a keep level is a ratio in (0, 1] or 'default', got {text!r}")
    return value

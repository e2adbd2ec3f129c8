"""Presets: measured default schedules, one JSON file per model architecture, found by fingerprint.

A preset names the layers after which a model's last-query attention still finds what a question needs, and
how much to keep there; `trimformer calibrate schedule` measures one for the model at hand and `trimformer
tune` one that reaches a measured speedup (docs/calibration.md). The file holds the schedule beside what it
was made for and what was measured::

    {"format": 1,
     "model": {"name", "fingerprint", "model_type", "num_hidden_layers", "hidden_size", ...},
     "method": "lazy", "schedule": {"7": 0.4, ...}, "options": {...}, "target": {...},
     "measured": {...}, "calibration": {...}}

`preset_for(config, path)` looks for a model's preset in this order: the file `path` (TrimConfig's
``preset``; its fingerprint must match the model), a user-calibrated preset in the cache folder
(``<cache root>/presets/<fingerprint>.json``, the cache root of `loading.cache_root`), a preset shipped in
this folder. With none, it warns once per architecture and the depth-fraction schedule is used.

The fingerprint hashes the architecture only (`FINGERPRINT_FIELDS`), so fine-tunes of one architecture
(a base model and its instruct version) share a fingerprint and its preset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..loading import cache_root

FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent
FINGERPRINT_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                      "num_key_value_heads", "intermediate_size", "vocab_size", "head_dim", "layer_types")
CALIBRATE_COMMAND = "trimformer calibrate schedule --model M --out preset.json"
_WARNED: set[str] = set()


# ---- the architecture and its fingerprint ----------------------------------------------------------
def architecture(config: Any) -> dict[str, Any]:
    """The fields of a model config the fingerprint hashes: head_dim defaults to hidden / heads, and
    layer_types is kept only when some layer is not full attention (so configs that spell out an all-full
    list and those that omit it agree)."""
    fields = {name: getattr(config, name, None) for name in FINGERPRINT_FIELDS}
    if fields["head_dim"] is None and fields["hidden_size"] and fields["num_attention_heads"]:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    types = fields["layer_types"]
    fields["layer_types"] = list(types) if types and any(t != "full_attention" for t in types) else None
    return fields


def fingerprint(config: Any) -> str:
    """A short stable hash (16 hex digits) of the model's architecture fields (`FINGERPRINT_FIELDS`).
    Weights do not enter it: fine-tunes of one architecture share a fingerprint."""
    text = json.dumps(architecture(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_name(config: Any) -> str:
    """A readable name for messages: the folder or hub id the config came from, else its type and depth."""
    path = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if path:
        return Path(str(path)).name or str(path)
    return f"{getattr(config, 'model_type', 'model')} with {getattr(config, 'num_hidden_layers', '?')} layers"


# ---- reading and writing preset files --------------------------------------------------------------
def load_preset(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a preset file; the schedule comes back as {int layer: float keep}. A malformed file
    raises `ConfigError` saying what is wrong and what the format accepts."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"preset file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"preset file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ConfigError(f"preset file {path}: format must be {FORMAT}, got {data.get('format')!r}")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise ConfigError(f"preset file {path}: 'model' must be an object with a 'fingerprint' string "
                          f"(from trimformer.presets.fingerprint(model.config))")
    data["schedule"] = _check_schedule(data.get("schedule"), f"preset file {path}")
    for name in ("options", "target", "measured", "calibration"):
        if not isinstance(data.setdefault(name, {}), dict):
            raise ConfigError(f"preset file {path}: {name!r} must be an object, got {data[name]!r}")
    if not isinstance(data.setdefault("method", "lazy"), str):
        raise ConfigError(f"preset file {path}: 'method' must be a method name, got {data['method']!r}")
    data["path"] = str(path)
    return data


def save_preset(path: str | os.PathLike, config: Any, schedule: dict[int, float], *, name: str | None = None,
                method: str = "lazy", options: dict | None = None, target: dict | None = None,
                measured: dict | None = None, calibration: dict | None = None) -> Path:
    """Write a preset for the model whose config is `config` (atomically; parent folders are made)."""
    plan = _check_schedule(schedule, "schedule")
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and max(plan) > layers - 2:
        raise ConfigError(f"schedule names layer {max(plan)}, but the model has {layers} layers: prune after "
                          f"layers 0..{layers - 2}")
    data = {
        "format": FORMAT,
        "model": {"name": name or model_name(config), "fingerprint": fingerprint(config), **architecture(config)},
        "method": method,
        "schedule": {str(layer): keep for layer, keep in sorted(plan.items())},
        "options": options or {},
        "target": target or {},
        "measured": measured or {},
        "calibration": calibration or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _check_schedule(schedule: Any, where: str) -> dict[int, float]:
    if not isinstance(schedule, dict) or not schedule:
        raise ConfigError(f"{where}: 'schedule' must be a non-empty object {{layer: keep}}, e.g. "
                          f'{{"7": 0.4, "14": 0.5}}, got {schedule!r}')
    plan: dict[int, float] = {}
    for key, keep in schedule.items():
        layer = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ConfigError(f"{where}: schedule keys must be layer indices >= 0, got {key!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0 \
                or math.isnan(keep):
            raise ConfigError(f"{where}: schedule[{key}] must be a keep ratio in (0, 1], got {keep!r}")
        plan[layer] = float(keep)
    return dict(sorted(plan.items()))


# ---- finding a model's preset ----------------------------------------------------------------------
def cache_dir() -> Path:
    """Where user-calibrated presets live: <cache root>/presets (TRIMFORMER_CACHE, else XDG, else ~/.cache)."""
    return cache_root() / "presets"


def cache_path(config: Any) -> Path:
    """The cache file a user-calibrated preset for this architecture is found at."""
    return cache_dir() / f"{fingerprint(config)}.json"


def shipped_presets() -> list[dict[str, Any]]:
    """Every preset shipped with trimformer, in file-name order."""
    return [load_preset(p) for p in sorted(SHIPPED_DIR.glob("*.json"))]


def find_preset(config: Any, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The preset (as `load_preset` gives it, with ``source``: "path", "cache" or "shipped") for a model
    config: the file `path` (its fingerprint must match), else the cache folder's, else a shipped one."""
    key = fingerprint(config)
    if path is not None:
        preset = load_preset(path)
        if preset["model"]["fingerprint"] != key:
            made_for = preset["model"].get("name") or "another model"
            raise ConfigError(
                f"preset {path} was made for {made_for} (fingerprint {preset['model']['fingerprint']}, "
                f"{preset['model'].get('model_type')} with {preset['model'].get('num_hidden_layers')} layers); "
                f"this model ({model_name(config)}) has fingerprint {key}. Calibrate one for it: {CALIBRATE_COMMAND}")
        return {**preset, "source": "path"}
    cached = cache_dir() / f"{key}.json"
    if cached.exists():
        preset = load_preset(cached)
        if preset["model"]["fingerprint"] == key:
            return {**preset, "source": "cache"}
    for preset in shipped_presets():
        if preset["model"]["fingerprint"] == key:
            return {**preset, "source": "shipped"}
    return None


def preset_for(config: Any, path: str | os.PathLike | None = None) -> dict[int, float] | None:
    """The measured default schedule {layer: keep} for a model config, or None (after warning once per
    architecture and process that the depth-fraction schedule is used)."""
    preset = find_preset(config, path)
    if preset is not None:
        return dict(preset["schedule"])
    key = fingerprint(config)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"trimformer has no preset for {model_name(config)} (fingerprint {key}): without layers or a schedule "
            f"given, it prunes after 20/40/60/80% of the depth, a fallback not measured on this model. Calibrate "
            f"a schedule with `{CALIBRATE_COMMAND}` "
            f"(add --save-to-cache to have trim() find it)", UserWarning, stacklevel=2)
    return None


__all__ = ["FORMAT", "architecture", "cache_dir", "cache_path", "find_preset", "fingerprint", "load_preset",
           "model_name", "preset_for", "save_preset", "shipped_presets"]

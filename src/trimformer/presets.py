"""Measured default schedules for models trimformer has been tuned on.

A preset names the layers after which the model's last-query attention is known to find what a
question needs, and how much to keep there. Layers were chosen by measurement, not by depth:
for SmolLM2-135M, the attention of the last 64 queries puts a hidden needle sentence in the top 0.1%
of a 4K-token context at layers 7, 14, 17-18 and 23, and near the median at most other layers
(docs/prefill.md, "Schedules and presets", and docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    schedule: dict[int, float]


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("llama", 30, 576, 9, {7: 0.4, 14: 0.5, 18: 0.5, 23: 0.5}),
}


def preset_for(config) -> dict[int, float] | None:
    """The measured default schedule for a model config, or None."""
    for preset in PRESETS.values():
        if (
            getattr(config, "model_type", None) == preset.model_type
            and getattr(config, "num_hidden_layers", None) == preset.num_hidden_layers
            and getattr(config, "hidden_size", None) == preset.hidden_size
            and getattr(config, "num_attention_heads", None) == preset.num_attention_heads
        ):
            return dict(preset.schedule)
    return None

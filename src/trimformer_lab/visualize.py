"""Seeing what a trim did: merged image regions (as ToMe draws them) and kept / pruned text tokens.

* `merged_regions_png(model, pixel_values, path)`: after a forward of a ToMe-trimmed vision encoder,
  every patch is painted with the mean colour of the merged token it ended in, with borders between
  merged regions (``trace_source=True`` also lets you pick an earlier layer).
* `latent_merges_png(denoiser_or_pipeline, path)`: after a forward of a ToMe-merged diffusion model
  (``trace_source=True``), each merging block's latent grid with every merged group in its own colour,
  its destination token marked, and tokens left alone in grey.
* `token_depths(model, ...)`: for a trimmed decoder or text encoder, how many layers each prompt token
  went through (its depth: the model's layer count when it was never dropped), and for encoders the
  merged group of each token.
* `text_html(...)` / `text_png(...)`: the prompt with kept tokens plain, pruned tokens grey and struck
  through (the tooltip gives the layer they were dropped after), merged tokens sharing a colour.
"""

from __future__ import annotations

import colorsys
import html
import math
from pathlib import Path

import torch

from trimformer.errors import InputError, TrimformerError
from trimformer.patch.cache_names import output_cache

PATCH_ATTR = "_trimformer_patch"
STATE_ATTR = "_trimformer_state"


def _patch(model):
    patch = getattr(model, PATCH_ATTR, None)
    if patch is None:
        raise TrimformerError("this model is not trimmed; call trim(model, ...) and run a forward first")
    return patch


# ---- images --------------------------------------------------------------------------------------
def patch_groups(model, row: int = 0, layer: int | None = None) -> torch.Tensor:
    """(N,) the slot each input token (patch) of `row` ended in after `layer` (default: the last);
    -1 for dropped tokens. Needs a forward of a trimmed encoder; an earlier layer needs trace_source=True."""
    patch = _patch(model)
    state = getattr(patch, "state", None)
    if state is None or getattr(state, "owner", None) is None:
        raise TrimformerError("no forward has run since trim() (or the model is a decoder: use token_depths)")
    if layer is None:
        owner = state.owner
    else:
        if not state.owners:
            raise TrimformerError("per-layer groups need trim(..., trace_source=True)")
        if not -len(state.owners) <= layer < len(state.owners):
            raise InputError(f"layer must be in [0, {len(state.owners)}), got {layer}")
        owner = state.owners[layer]
    if not 0 <= row < owner.shape[0]:
        raise InputError(f"row must be in [0, {owner.shape[0]}), got {row}")
    return owner[row].cpu()


def _to_image(pixels: torch.Tensor):
    """(3, H, W) model input -> (H, W, 3) float array in [0, 1] (min-max per image: undoes any normalisation
    well enough to look at)."""
    x = pixels.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    return x.permute(1, 2, 0).numpy()


def merged_regions_png(model, pixel_values: torch.Tensor, path: str | Path, row: int = 0,
                       layer: int | None = None, image=None) -> Path:
    """Write a PNG of the merged regions of image `row` (ToMe's visualisation): each patch painted with
    the mean colour of its merged token's patches, borders between regions; dropped patches black.
    `image`: an (H, W, 3) array in [0, 1] to paint instead of the min-max-scaled model input."""
    import numpy as np
    from PIL import Image

    patch = _patch(model)
    groups = patch_groups(model, row, layer)
    protected = getattr(getattr(patch, "family", None), "protected", 1)
    groups = groups[protected:]
    n = groups.numel()
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise InputError(f"{n} patch tokens do not form a square grid; merged_regions_png needs a square image")
    img = np.asarray(image, dtype=np.float32) if image is not None else _to_image(pixel_values[row])
    h, w = img.shape[:2]
    ph, pw = h // side, w // side
    img = img[: ph * side, : pw * side]
    cells = img.reshape(side, ph, side, pw, 3).transpose(0, 2, 1, 3, 4)          # (side, side, ph, pw, 3)
    means = cells.mean(axis=(2, 3)).reshape(n, 3)
    g = groups.numpy()
    out_cells = np.zeros((n, 3), dtype=np.float32)
    for slot in np.unique(g):
        if slot < 0:
            continue
        members = g == slot
        out_cells[members] = means[members].mean(0)
    grid = g.reshape(side, side)
    canvas = np.repeat(np.repeat(out_cells.reshape(side, side, 3), ph, 0), pw, 1)
    border = np.zeros((side * ph, side * pw), dtype=bool)
    for i in range(side):
        for j in range(side):
            if j + 1 < side and grid[i, j] != grid[i, j + 1]:
                border[i * ph:(i + 1) * ph, (j + 1) * pw - 1] = True
            if i + 1 < side and grid[i, j] != grid[i + 1, j]:
                border[(i + 1) * ph - 1, j * pw:(j + 1) * pw] = True
    canvas[border] = 1.0
    both = np.concatenate([img, np.ones((img.shape[0], 4, 3), dtype=np.float32), canvas], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray((both.clip(0, 1) * 255).astype(np.uint8))
    scale = max(1, 224 // max(img.shape[0], 1))                 # small inputs: enlarge to look at
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return path


# ---- latent grids (diffusion) ----------------------------------------------------------------------
def latent_merges(model) -> list:
    """The merging blocks of the last forward of a trimmed diffusion model (or pipeline), each with the
    merged slot of every token (`slot` (B, N)) and the destinations (`dst`); needs trace_source=True."""
    from trimformer.patch.diffusion import denoiser_of

    patch = _patch(denoiser_of(model))
    last = getattr(patch, "last", None)
    if last is None or not hasattr(last, "grid"):
        raise TrimformerError("no forward of a trimmed diffusion model has run since trim()")
    blocks = [b for b in last.blocks if b.merged]
    if blocks and blocks[0].slot is None:
        raise TrimformerError("merge maps need trim(..., trace_source=True)")
    return blocks


def latent_merges_png(model, path: str | Path, row: int = 0, blocks: list[str] | None = None,
                      latents: torch.Tensor | None = None, cell: int = 8) -> Path:
    """Write a PNG with one panel per merging block (or the `blocks` named): each latent token a
    `cell`-pixel square, the tokens of a merged group in the group's colour with its destination marked
    by a dark centre, tokens merged with nothing in light grey. `latents` (B, C, H, W): the input latent,
    drawn first (its first three channels, min-max scaled)."""
    import numpy as np
    from PIL import Image

    chosen = [b for b in latent_merges(model) if blocks is None or b.name in blocks]
    if not chosen:
        raise TrimformerError(f"no merging block among {blocks}" if blocks else "no block merged in the last forward")
    panels = []
    if latents is not None:
        x = latents[row, :3].detach().float().cpu()
        x = ((x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)).permute(1, 2, 0).numpy()
        panels.append(np.repeat(np.repeat(x, cell, 0), cell, 1))
    for block in chosen:
        if not 0 <= row < block.slot.shape[0]:
            raise InputError(f"row must be in [0, {block.slot.shape[0]}), got {row}")
        h, w = block.grid
        slot = block.slot[row].numpy()
        counts = np.bincount(slot, minlength=slot.max() + 1)
        colours = np.array([_rgb(i) for i in range(counts.size)], dtype=np.float32)
        tokens = np.where((counts[slot] > 1)[:, None], colours[slot], 0.85).reshape(h, w, 3)
        canvas = np.repeat(np.repeat(tokens, cell, 0), cell, 1)
        c0, c1 = cell // 3, cell - cell // 3
        for pos in block.dst.tolist():
            if counts[slot[pos]] > 1:
                y, x_ = divmod(pos, w)
                canvas[y * cell + c0:y * cell + c1, x_ * cell + c0:x_ * cell + c1] *= 0.35
        panels.append(canvas)
    height = max(p.shape[0] for p in panels)
    gap = np.ones((height, cell, 3), dtype=np.float32)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=1.0) for p in panels]
    picture = np.concatenate([part for p in padded for part in (p, gap)][:-1], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((picture.clip(0, 1) * 255).astype(np.uint8)).save(path)
    return path


def _rgb(i: int) -> tuple[float, float, float]:
    """A distinct, saturated colour for group `i` (golden-ratio hues)."""
    return colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.55 + 0.35 * ((i * 7) % 3) / 2, 0.9)


# ---- text ----------------------------------------------------------------------------------------
def token_depths(model, input_ids: torch.Tensor, output=None, row: int = 0) -> dict:
    """What a trimmed model did with the prompt tokens of `row`, after a forward.

    Returns ``{"depth": (T,) layers each token went through (num_layers = never dropped), "group": (T,)
    merged group (encoders; -1 dropped, else the slot it ended in) or None, "num_layers": L}``.
    Decoders: pass the forward's `output` (its KV cache carries trimformer's state, which records the
    original position held by every layer's cache slots). Left padding is skipped."""
    patch = _patch(model)
    if hasattr(patch, "family"):                                  # encoder
        state = patch.state
        if state is None or state.owner is None:
            raise TrimformerError("no forward has run since trim()")
        n_layers = len(state.attn_tokens)
        owner = state.owner[row].cpu()
        depth = torch.full(owner.shape, n_layers, dtype=torch.long)
        if state.owners:                                         # traced: the layer a token was dropped at
            for layer in reversed(range(len(state.owners))):
                depth = torch.where(state.owners[layer][row].cpu() < 0, torch.tensor(layer + 1), depth)
        else:
            depth = torch.where(owner < 0, torch.tensor(0), depth)
        length = int(state.lengths[row])
        return {"depth": depth[:length], "group": owner[:length], "num_layers": n_layers}
    cache = output_cache(output) if output is not None else None
    tstate = getattr(cache, STATE_ATTR, None) if cache is not None else None
    if tstate is None:
        raise InputError("for a decoder, pass output=model(..., use_cache=True): its KV cache carries "
                         "the kept positions")
    t = input_ids.shape[-1]
    n_layers = len(tstate.slots)
    depth = torch.zeros(t, dtype=torch.long)
    length = int(tstate.prompt_lengths[row])
    for layer, slots in enumerate(tstate.slots):
        if slots is None:
            continue
        positions = slots.positions[row][slots.valid[row]].cpu()
        present = torch.zeros(max(t, length), dtype=torch.bool)
        present[positions[positions < present.numel()]] = True
        depth += present[:t].long()
    pad = t - length
    depth = depth[:length] if pad == 0 else depth[:length]
    return {"depth": depth, "group": None, "num_layers": n_layers, "pad": pad}


def _tokens(tokenizer, input_ids: torch.Tensor, row: int, info: dict) -> list[str]:
    ids = input_ids[row].tolist()
    pad = info.get("pad", 0)
    if pad:                                    # decoders: left padding (positions count real tokens only)
        ids = ids[pad:]
    ids = ids[: len(info["depth"])]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.convert_ids_to_tokens(i) if hasattr(tokenizer, "convert_ids_to_tokens") else str(i)
            for i in ids]


def _palette(k: int) -> str:
    hue = (k * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.85, 0.6)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def text_html(model, tokenizer, input_ids: torch.Tensor, output=None, row: int = 0,
              path: str | Path | None = None, title: str = "trimformer: kept and pruned tokens") -> str:
    """An HTML page marking each prompt token kept (plain) or pruned (grey, struck through; tooltip: after
    which layer); tokens merged together share a background colour. Written to `path` if given."""
    info = token_depths(model, input_ids, output, row)
    tokens = _tokens(tokenizer, input_ids, row, info)
    depth, group, n_layers = info["depth"], info["group"], info["num_layers"]
    sizes: dict[int, int] = {}
    if group is not None:
        for g in group.tolist():
            sizes[g] = sizes.get(g, 0) + 1
    spans = []
    for i, tok in enumerate(tokens):
        text = html.escape(tok.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n"))
        d = int(depth[i])
        if d < n_layers:
            spans.append(f'<span class="pruned" data-kept="0" title="token {i}: pruned after layer {d - 1}">'
                         f"{text}</span>")
            continue
        style, note = "", "kept"
        if group is not None and sizes.get(int(group[i]), 1) > 1:
            style = f' style="background:{_palette(int(group[i]))}"'
            note = f"kept, merged into slot {int(group[i])} with {sizes[int(group[i])] - 1} other token(s)"
        spans.append(f'<span class="kept" data-kept="1"{style} title="token {i}: {note}">{text}</span>')
    kept = int((depth >= n_layers).sum())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.8; }}
span {{ padding: 1px 2px; margin: 0 1px; border-radius: 3px; white-space: pre-wrap; }}
.kept {{ color: #000; }}
.pruned {{ color: #aaa; text-decoration: line-through; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{kept} of {len(tokens)} tokens went through all {n_layers} layers; grey struck-through tokens were pruned
(hover for the layer); tokens sharing a colour were merged.</p>
<div>{' '.join(spans)}</div>
</body></html>
"""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(page, encoding="utf-8")
    return page


def text_png(model, tokenizer, input_ids: torch.Tensor, path: str | Path, output=None, row: int = 0,
             max_tokens: int = 400) -> Path:
    """A PNG strip: one cell per prompt token, coloured by how many layers it went through (dark = all of
    them), merged tokens outlined in their group's colour; token labels when there are few tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = token_depths(model, input_ids, output, row)
    tokens = _tokens(tokenizer, input_ids, row, info)[:max_tokens]
    depth = info["depth"][:max_tokens].float()
    n_layers = info["num_layers"]
    group = info["group"]
    per_line = 40
    lines = max(1, math.ceil(len(tokens) / per_line))
    fig, ax = plt.subplots(figsize=(min(16, 0.4 * per_line), 0.6 * lines + 1.0))
    cmap = plt.get_cmap("viridis")
    for i, tok in enumerate(tokens):
        x, y = i % per_line, -(i // per_line)
        frac = float(depth[i]) / max(n_layers, 1)
        edge = "none"
        if group is not None and frac >= 1 and int((group == group[i]).sum()) > 1:
            edge = _palette(int(group[i]))
        ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, color=cmap(frac) if frac >= 1 else (0.85, 0.85, 0.85),
                                   ec=edge, lw=2.5 if edge != "none" else 0))
        if len(tokens) <= 200:
            ax.text(x + 0.47, y + 0.45, tok[:6], ha="center", va="center", fontsize=6,
                    color="white" if frac >= 1 else "black")
    ax.set_xlim(0, per_line)
    ax.set_ylim(-lines + 1 - 0.1, 1)
    ax.axis("off")
    kept = int((info["depth"] >= n_layers).sum())
    ax.set_title(f"kept {kept} / {len(info['depth'])} tokens through all {n_layers} layers "
                 "(grey: pruned; outlines: merged groups)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

"""Figures: dynamic high-resolution tiling with its tile tags, per-tile image attribution maps,
and training curves.

Every function returns a `matplotlib.figure.Figure` built without pyplot and drawn by the Agg
canvas, so it works headless (no display, no global figure state): save it with
`fig.savefig("x.png")`; in a notebook (after `%matplotlib inline`) a figure left as a cell's
last value is shown inline.

Per-tile maps (`answer_saliency`, `plot_tile_maps`). NVLM-X and NVLM-H reach their regular
tiles only through the gated cross-attention blocks, whose attention weights live inside the
fused attention function and are not returned. What we compute instead is real and arch-agnostic:
gradient x input attribution of the answer's log-likelihood to the input pixels,
`|sum_c x * d log p(answer | image, question) / dx|`, summed over each ViT patch. For X/H the
gradient to a regular tile flows through the cross-attention blocks only, so its map shows
which parts of which tile the cross-attention read to produce the answer (for D it flows
through the decoder's self-attention over the image tokens). `plot_tile_maps` also takes any
other per-tile weights `[tiles, tokens]` (e.g. attention weights averaged over heads and text
positions) and lays them out on the tiles' token grid.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from nvlm_jax.processing import open_image, select_grid, tile_image, tile_tags
from nvlm_jax.processing.tiling import DEFAULT_MAX_NUM, DEFAULT_TILE_SIZE, IMAGENET_MEAN, IMAGENET_STD


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(ax, x: float, y: float, text: str, size: float = 8) -> None:
    ax.text(x, y, text, fontsize=size, family="monospace", ha="left", va="top",
            bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))


# ---- tiling ----------------------------------------------------------------------------------------


def plot_tiling(
    image: Any,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    max_tiles: int = DEFAULT_MAX_NUM,
    use_thumbnail: bool = True,
    tag_style: str = "1d",
    tokens_per_tile: int = 256,
) -> Figure:
    """The image as the model sees it: resized to its tile grid, the grid drawn on it with each
    tile's tag, and the global thumbnail beside it (when there is more than one tile).

    image: a path, bytes, PIL image or `[H, W, 3]` uint8 array; the other arguments are the
    tiling settings (the release's: 448-px tiles, up to 6, thumbnail, 1-D tags).
    """
    pil = open_image(_as_pil(image))
    cols, rows = select_grid(pil.width, pil.height, max_num=max_tiles, tile_size=tile_size)
    tiled = tile_image(pil, max_tiles, tile_size=tile_size, use_thumbnail=use_thumbnail, normalize=False)
    tags = tile_tags(tiled.num_tiles, tiled.grid, tag_style=tag_style, use_thumbnail=use_thumbnail)
    regular = cols * rows
    resized = np.asarray(pil.resize((cols * tile_size, rows * tile_size)))
    fig = _figure(4.0 * (cols / rows + (0.6 if tiled.has_thumbnail else 0)) + 1.0, 4.2)
    widths = [cols / rows, 0.6] if tiled.has_thumbnail else [1.0]
    axes = fig.subplots(1, len(widths), width_ratios=widths, squeeze=False)[0]
    ax = axes[0]
    ax.imshow(resized)
    for k in range(regular):
        r, c = divmod(k, cols)
        ax.add_patch(Rectangle((c * tile_size, r * tile_size), tile_size, tile_size, fill=False, edgecolor="red",
                               linewidth=2))
        if tags[k]:  # a single tile is tagged as the thumbnail (release)
            _label(ax, c * tile_size + 0.03 * tile_size, r * tile_size + 0.04 * tile_size, tags[k])
    ax.set_xticks([])
    ax.set_yticks([])
    total = tiled.num_tiles
    ax.set_title(f"{pil.width}x{pil.height} px -> {cols}x{rows} tiles of {tile_size} px"
                 + (" + thumbnail" if tiled.has_thumbnail else "")
                 + f" = {total} tiles, {total * tokens_per_tile} image tokens", fontsize=9)
    if tiled.has_thumbnail:
        thumb = axes[1]
        thumb.imshow(tiled.pixels[-1])
        _label(thumb, 0.03 * tile_size, 0.04 * tile_size, tags[-1] or "thumbnail", size=7)
        thumb.set_xticks([])
        thumb.set_yticks([])
        thumb.set_title("global thumbnail", fontsize=9)
    return fig


def _as_pil(image: Any):
    if isinstance(image, np.ndarray):
        from PIL import Image

        return Image.fromarray(np.asarray(image, np.uint8))
    return image


# ---- per-tile maps ---------------------------------------------------------------------------------


def denormalize(pixels: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float tiles `[..., 3]` back to uint8 RGB."""
    rgb = np.asarray(pixels, np.float32) * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def _grid_maps(maps: np.ndarray) -> np.ndarray:
    """[tiles, h, w] as is; [tiles, tokens] → [tiles, sqrt(tokens), sqrt(tokens)]."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 3:
        return maps
    if maps.ndim == 2:
        side = math.isqrt(maps.shape[1])
        if side * side != maps.shape[1]:
            raise ValueError(f"per-tile weights [tiles, tokens] need a square token count, got {maps.shape[1]}")
        return maps.reshape(maps.shape[0], side, side)
    raise ValueError(f"maps must be [tiles, tokens] or [tiles, h, w], got shape {maps.shape}")


def plot_tile_maps(
    tiles: np.ndarray,
    maps: np.ndarray,
    tags: Sequence[str] | None = None,
    *,
    title: str = "",
    normalize: str = "global",
    alpha: float = 0.55,
) -> Figure:
    """Each tile with a heat map over it, one panel per tile.

    Args:
      tiles: `[tiles, H, W, 3]` uint8 RGB (or ImageNet-normalised float, converted back).
      maps: per-tile weights, `[tiles, h, w]` (any grid, upsampled to the tile) or
        `[tiles, tokens]` with a square number of tokens (row-major token grid, e.g. the 16x16
        pixel-shuffled tokens of a 448-px tile).
      tags: a label per tile (e.g. its tile tag).
      normalize: "global" (one colour scale, so tiles compare) or "tile" (each tile its own).
      alpha: opacity of the heat map.
    """
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8:
        tiles = denormalize(tiles)
    grid = _grid_maps(maps)
    if grid.shape[0] != tiles.shape[0]:
        raise ValueError(f"{grid.shape[0]} maps for {tiles.shape[0]} tiles")
    if tags is not None and len(tags) != tiles.shape[0]:
        raise ValueError(f"{len(tags)} tags for {tiles.shape[0]} tiles")
    if normalize not in ("global", "tile"):
        raise ValueError(f"normalize must be 'global' or 'tile', got {normalize!r}")
    n = tiles.shape[0]
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig = _figure(2.6 * ncols, 2.6 * nrows + (0.3 if title else 0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    top = float(grid.max()) or 1.0
    size = tiles.shape[1]
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        ax.imshow(tiles[k])
        scale = (float(grid[k].max()) or 1.0) if normalize == "tile" else top
        ax.imshow(grid[k] / scale, cmap="inferno", alpha=alpha, vmin=0.0, vmax=1.0,
                  extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
        if tags is not None and tags[k]:
            _label(ax, 0.03 * size, 0.04 * size, tags[k], size=7)
        ax.set_title(f"tile {k}: {grid[k].sum() / max(grid.sum(), 1e-30):.0%} of total", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


@dataclasses.dataclass(frozen=True)
class TileSaliency:
    """Attribution of an answer to the tiles of one image.

    Attributes:
      maps: `[tiles, patches_h, patches_w]` float32, |gradient x input| summed per ViT patch.
      tiles: `[tiles, H, W, 3]` uint8, the tiles as the model saw them.
      tags: each tile's tag (regular tiles, then the thumbnail).
      answer: the answer whose log-likelihood was attributed.
    """

    maps: np.ndarray
    tiles: np.ndarray
    tags: tuple[str, ...]
    answer: str

    def plot(self, title: str | None = None, **kwargs) -> Figure:
        return plot_tile_maps(self.tiles, self.maps, self.tags, title=title or f"attribution of {self.answer!r}",
                              **kwargs)


def _question_batch(model, image, question: str, answer: str):
    """A one-row training batch (the data pipeline's transforms, so every arch's contract holds)
    with `answer` as the assistant turn."""
    from nvlm_jax.data.pipeline import record_batch
    from nvlm_jax.processing import encode_prompt

    cfg, tok = model.config, model.tokenizer
    tiled = tile_image(image, cfg.max_tiles, tile_size=cfg.vision.image_size, use_thumbnail=cfg.use_thumbnail)
    prompt = encode_prompt(tok, "<image>\n" + question, [tiled.num_tiles], arch=cfg.arch,
                           tokens_per_tile=cfg.num_image_tokens, use_thumbnail=cfg.use_thumbnail)
    seq_len = -(-(len(prompt.input_ids) + 4 * len(answer) + 8) // 64) * 64  # room for the answer
    record = {"conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
              "images": [image]}
    batch = record_batch(record, cfg, tok, seq_len=seq_len, tiles_per_row=tiled.num_tiles,
                         what="question and answer")
    return batch, tiled


def answer_saliency(
    model, image, question: str, answer: str | None = None, *, max_new_tokens: int = 16
) -> TileSaliency:
    """Gradient x input attribution of `answer` (default: the model's own greedy answer) to
    each ViT patch of each tile of `image` (see the module docstring).

    model: an `NVLMModel` (any arch); image: a path / PIL image / uint8 array.
    """
    import jax
    import jax.numpy as jnp

    from nvlm_jax.models import nvlm
    from nvlm_jax.models.loss import token_stats

    image = _as_pil(image)
    if answer is None:
        answer = model.chat(image, question, max_new_tokens=max_new_tokens)
    if not answer:
        raise ValueError("the answer is empty: there is nothing to attribute")
    batch, tiled = _question_batch(model, image, question, answer)
    cfg = model.config
    pixels = jnp.asarray(batch["pixel_values"], jnp.float32)
    fixed = {k: np.asarray(v) for k, v in batch.items() if k != "pixel_values"}  # static: host-side checks read them

    def log_likelihood(px):
        logits = nvlm.apply_batch(model.params, cfg, dict(fixed, pixel_values=px.astype(cfg.dtype)))
        return -token_stats(logits, fixed["targets"], fixed["loss_mask"]).loss_sum

    grad = np.asarray(jax.jit(jax.grad(log_likelihood))(pixels), np.float32)[0]  # [tiles, H, W, 3]
    contrib = np.abs((grad * np.asarray(pixels[0])).sum(-1))  # [tiles, H, W]
    p = cfg.vision.patch_size
    t, h, w = contrib.shape
    maps = contrib.reshape(t, h // p, p, w // p, p).sum(axis=(2, 4))[: tiled.num_tiles]
    tags = tile_tags(tiled.num_tiles, tiled.grid, use_thumbnail=cfg.use_thumbnail)
    raw = tile_image(image, cfg.max_tiles, tile_size=cfg.vision.image_size, use_thumbnail=cfg.use_thumbnail,
                     normalize=False).pixels
    return TileSaliency(maps.astype(np.float32), raw, tags, answer)


# ---- training curves -------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics JSONL file, or of `<workdir>/metrics.jsonl` when given a folder."""
    from nvlm_jax.records import METRICS_FILE, read_jsonl

    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    return read_jsonl(path)


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], float(r[key])) for r in records
              if key in r and "step" in r and isinstance(r[key], int | float)]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps), np.asarray(values)


def plot_training_curves(
    path: str | os.PathLike,
    panels: Sequence[Sequence[str]] = (("train/loss", "eval/loss"), ("train/accuracy", "eval/exact_match*"),
                                       ("train/lr",)),
) -> Figure:
    """Training curves from a workdir's `metrics.jsonl` (as `nvlm_jax.train` writes it).

    panels: the metric keys drawn together in each panel; a key ending in "*" stands for every
    key with that prefix (e.g. the per-task `eval/exact_match/<task>`). Panels with no data are
    left out; ValueError if none has any.
    """
    records = read_metrics(path)
    keys_seen = sorted({k for r in records for k in r})
    drawn = []
    for panel in panels:
        keys = []
        for key in panel:
            keys += [k for k in keys_seen if k.startswith(key[:-1])] if key.endswith("*") else [key]
        series = {k: _series(records, k) for k in keys}
        series = {k: v for k, v in series.items() if v[0].size}
        if series:
            drawn.append(series)
    if not drawn:
        raise ValueError(f"{path}: no records with any of the keys {[k for p in panels for k in p]}")
    fig = _figure(4.2 * len(drawn), 3.2)
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    for ax, series in zip(axes, drawn, strict=True):
        for key, (steps, values) in series.items():
            style = "o-" if key.startswith("eval/") else "-"
            ax.plot(steps, values, style, label=key, markersize=3)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig

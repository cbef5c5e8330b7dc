"""The contract between the data pipeline and the training step: one batch of static shapes.

A batch is a dict of NumPy arrays (B rows, S tokens, T tile slots per row):

- ``input_ids``  int32 [B, S]: tokens; image slots hold the config's image context token (D, H).
- ``targets``    int32 [B, S]: the next token at each position (already shifted within each
  packed segment; arbitrary where ``loss_mask`` is False).
- ``loss_mask``  bool  [B, S]: True where ``targets`` is an assistant answer token (including its
  ``<|im_end|>``); never prompt, image, padding or a segment's last token.
- ``segment_ids`` int32 [B, S]: 1, 2, ... for the packed samples of a row; 0 for padding.
- ``positions``  int32 [B, S]: position within its segment (0, 1, ...).
- ``pixel_values`` float32 [B, T, H, W, 3]: each row's tiles, in the order their image tokens
  appear (per image: regular tiles, then thumbnail); padding slots are zeros.
- ``tile_valid`` bool [B, T]: False for padding tile slots.
- ``tile_image`` int32 [B, T]: row-level index (0, 1, ...) of the image each tile belongs to;
  -1 for padding slots.
- ``token_image`` int32 [B, S]: index of the latest image whose ``<Image>`` block starts at or
  before this token, within the token's segment; -1 if none. (Cross-attention rule, X/H.)
- ``token_tile`` int32 [B, S]: for the tokens of a tile tag (``<tile_k>`` or the thumbnail tag),
  the row-level tile slot it names; -1 otherwise. (Cross-attention rule, X/H.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FIELDS: dict[str, tuple[str, int]] = {
    # name: (dtype kind, rank)
    "input_ids": ("i", 2),
    "targets": ("i", 2),
    "loss_mask": ("b", 2),
    "segment_ids": ("i", 2),
    "positions": ("i", 2),
    "pixel_values": ("f", 5),
    "tile_valid": ("b", 2),
    "tile_image": ("i", 2),
    "token_image": ("i", 2),
    "token_tile": ("i", 2),
}


def validate_batch(batch: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """Checks names, dtypes and shapes; returns (B, S, T). Raises ValueError naming the field."""
    missing = sorted(set(FIELDS) - set(batch))
    if missing:
        raise ValueError(f"batch is missing fields {missing}")
    b, s = np.shape(batch["input_ids"])
    t = np.shape(batch["pixel_values"])[1]
    for name, (kind, rank) in FIELDS.items():
        arr = np.asarray(batch[name])
        if arr.ndim != rank or arr.dtype.kind != kind:
            raise ValueError(
                f"batch field {name!r}: expected rank {rank} kind {kind!r}, got shape {arr.shape} dtype {arr.dtype}"
            )
        lead = (b, t) if name in ("pixel_values", "tile_valid", "tile_image") else (b, s)
        if arr.shape[:2] != lead:
            raise ValueError(f"batch field {name!r}: leading shape {arr.shape[:2]} != {lead}")
    return b, s, t


def _fail(row: int, rule: str) -> None:
    raise ValueError(f"batch row {row}: {rule}")


def check_batch_semantics(batch: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """`validate_batch` plus the field semantics above, row by row; returns (B, S, T).

    Checks: segment ids are 0 only as trailing padding and count 1, 2, ... in order; positions
    restart at 0 and count up within each segment; padding has no loss; the last token of each
    segment has no loss; valid tile slots are a prefix; `tile_image` is -1 exactly on padding
    slots and non-decreasing over valid ones; padding slots hold zero pixels; `token_tile` names
    valid slots only; `token_image` is -1 on padding and names images that own valid tiles.
    Raises ValueError naming the row and the broken rule. Meant for tests and debugging (it loops
    over rows in Python).
    """
    b, s, t = validate_batch(batch)
    for r in range(b):
        seg = np.asarray(batch["segment_ids"][r])
        pos = np.asarray(batch["positions"][r])
        loss = np.asarray(batch["loss_mask"][r])
        used = int(np.count_nonzero(seg))
        if (seg[:used] == 0).any() or (seg[used:] != 0).any():
            _fail(r, "segment id 0 (padding) appears before the end of the row")
        if used and (seg[0] != 1 or (np.diff(seg[:used]) < 0).any() or (np.diff(seg[:used]) > 1).any()):
            _fail(r, "segment ids must count 1, 2, ... in order")
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[:used]])) != 0)
        expected = np.arange(used) - np.repeat(starts, np.diff(np.concatenate([starts, [used]])))
        if not np.array_equal(pos[:used], expected):
            _fail(r, "positions must restart at 0 in every segment")
        if loss[used:].any():
            _fail(r, "padding tokens carry loss")
        ends = np.concatenate([starts[1:], [used]]) - 1 if used else np.zeros(0, int)
        if loss[ends].any():
            _fail(r, "the last token of a segment carries loss (its target is outside the segment)")
        valid = np.asarray(batch["tile_valid"][r])
        n = int(np.count_nonzero(valid))
        if not valid[:n].all():
            _fail(r, "valid tile slots must come first")
        tile_image = np.asarray(batch["tile_image"][r])
        if (tile_image[n:] != -1).any() or (tile_image[:n] < 0).any() or (np.diff(tile_image[:n]) < 0).any():
            _fail(r, "tile_image must be non-decreasing image indices on valid slots and -1 elsewhere")
        if np.asarray(batch["pixel_values"][r][n:]).any():
            _fail(r, "padding tile slots must hold zeros")
        token_tile = np.asarray(batch["token_tile"][r])
        if (token_tile >= n).any() or (token_tile < -1).any():
            _fail(r, f"token_tile names a tile slot outside the {n} valid ones")
        token_image = np.asarray(batch["token_image"][r])
        if (token_image[used:] != -1).any():
            _fail(r, "token_image must be -1 on padding")
        named = set(np.unique(token_image[token_image >= 0]).tolist())
        if not named <= set(tile_image[:n].tolist()):
            _fail(r, "token_image names an image without valid tiles")
    return b, s, t

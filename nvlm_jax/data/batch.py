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
            raise ValueError(f"batch field {name!r}: expected rank {rank} kind {kind!r}, got "
                             f"shape {arr.shape} dtype {arr.dtype}")
        lead = (b, t) if name in ("pixel_values", "tile_valid", "tile_image") else (b, s)
        if arr.shape[:2] != lead:
            raise ValueError(f"batch field {name!r}: leading shape {arr.shape[:2]} != {lead}")
    return b, s, t

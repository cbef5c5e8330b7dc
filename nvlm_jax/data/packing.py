"""Rows of static shape: packing several samples per row (NVLM-D) or one sample per row (X/H), and batching.

A row has `seq_len` (S) token slots and `tiles_per_row` (T) tile slots. Packed samples are laid
out one after another: segment ids 1, 2, ... and positions restarting at 0 per sample; their
tiles are concatenated in token order into the row's tile slots, and the per-sample image and
tile indices are offset to row-level indices (`batch.py` documents every field).

`PackExamples` is a first-fit packer over `num_bins` open rows: a sample goes into the first
open row with room for both its tokens and its tiles, else opens a new row; when no row has
room and `num_bins` rows are open, all open rows are emitted (in the order they were opened)
and the sample starts the next window. Its checkpoint is small and exact: the parent's state
at the start of the window being emitted plus how many of its rows were already returned; a
restore re-reads that window (deterministic) and drops those rows.

`BatchRows` stacks rows into the batch contract, writing ImageNet-normalised float32 pixels
directly into the batch array (tiles travel as uint8 until here).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from nvlm_jax.data import mixture
from nvlm_jax.data import transforms as tr
from nvlm_jax.processing import tiling

STATS_KEY = "data_stats"  # batch entry holding the per-source record counts of the batch

_TOKEN_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "token_image", "token_tile")


@dataclasses.dataclass(frozen=True, eq=False)
class Row:
    """One row before batching.

    Attributes:
      tokens: `[S]` arrays: input_ids, targets (int32), loss_mask (bool), segment_ids, positions,
        token_image, token_tile (int32, row-level indices).
      pixels: uint8 `[n_k, t, t, 3]` tiles of each packed sample, in token order.
      tile_image: int32 `[sum n_k]`, row-level image index of each tile.
      stats: record counts of the samples in the row (see `mixture.AccountSkips`).
    """

    tokens: dict[str, np.ndarray]
    pixels: tuple[np.ndarray, ...]
    tile_image: np.ndarray
    stats: mixture.Counts

    @property
    def num_tiles(self) -> int:
        return int(self.tile_image.shape[0])


def build_row(examples: Sequence[tr.Example], *, seq_len: int, pad_id: int) -> Row:
    """Lays `examples` out in one row of `seq_len` tokens (padding: pad id, segment 0, no loss)."""
    total = sum(ex.length for ex in examples)
    if total > seq_len:
        raise ValueError(f"{total} tokens do not fit a row of {seq_len} (records {[ex.record for ex in examples]})")
    tokens = {
        "input_ids": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_mask": np.zeros(seq_len, bool),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "token_image": np.full(seq_len, -1, np.int32),
        "token_tile": np.full(seq_len, -1, np.int32),
    }
    tile_image, stats = [], {}
    pos = tile_offset = image_offset = 0
    for k, ex in enumerate(examples):
        span = slice(pos, pos + ex.length)
        tokens["input_ids"][span] = ex.input_ids
        tokens["targets"][span] = ex.targets
        tokens["loss_mask"][span] = ex.loss_mask
        tokens["segment_ids"][span] = k + 1
        tokens["positions"][span] = np.arange(ex.length, dtype=np.int32)
        tokens["token_image"][span] = np.where(ex.token_image >= 0, ex.token_image + image_offset, -1)
        tokens["token_tile"][span] = np.where(ex.token_tile >= 0, ex.token_tile + tile_offset, -1)
        tile_image.append(ex.tile_image + image_offset)
        mixture.merge_counts(stats, ex.stats)
        pos += ex.length
        tile_offset += ex.num_tiles
        image_offset += ex.num_images
    tile_image_arr = np.concatenate(tile_image).astype(np.int32) if tile_image else np.zeros((0,), np.int32)
    return Row(tokens, tuple(ex.pixels for ex in examples if ex.num_tiles), tile_image_arr, stats)


class ExampleToRow(grain.transforms.Map):
    """One sample per row, padded to `seq_len` (NVLM-X/H, or NVLM-D without packing)."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id

    def map(self, example: tr.Example) -> Row:
        return build_row([example], seq_len=self.seq_len, pad_id=self.pad_id)


@dataclasses.dataclass
class _Bin:
    examples: list[tr.Example]
    tokens: int = 0
    tiles: int = 0


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, tiles_per_row: int, num_bins: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._tiles_per_row = tiles_per_row
        self._num_bins = num_bins
        self._pad_id = pad_id
        self._bins: list[_Bin] = []
        self._ready: collections.deque[Row] = collections.deque()
        self._window_state = self._parent.get_state()  # before the first sample of the open window
        self._ready_state: dict[str, Any] | None = None  # before the first sample of the emitted window
        self._emitted = 0  # rows of the emitted window already returned
        self._drop = 0  # rows to drop from the next flush (after a restore)
        self._exhausted = False

    def _place(self, ex: tr.Example) -> bool:
        for b in self._bins:
            if b.tokens + ex.length <= self._seq_len and b.tiles + ex.num_tiles <= self._tiles_per_row:
                b.examples.append(ex)
                b.tokens += ex.length
                b.tiles += ex.num_tiles
                return True
        if len(self._bins) < self._num_bins:
            if ex.length > self._seq_len or ex.num_tiles > self._tiles_per_row:
                raise ValueError(
                    f"{ex.source}: {ex.record}: {ex.length} tokens / {ex.num_tiles} tiles cannot fit a row "
                    f"of {self._seq_len} tokens / {self._tiles_per_row} tiles"
                )
            self._bins.append(_Bin([ex], ex.length, ex.num_tiles))
            return True
        return False

    def _flush(self) -> None:
        self._ready.extend(build_row(b.examples, seq_len=self._seq_len, pad_id=self._pad_id) for b in self._bins)
        self._bins = []
        self._ready_state = self._window_state
        self._emitted = 0
        while self._drop and self._ready:
            self._ready.popleft()
            self._emitted += 1
            self._drop -= 1

    def __next__(self) -> Row:
        while not self._ready:
            if self._exhausted:
                raise StopIteration
            before = self._parent.get_state()
            try:
                ex = next(self._parent)
            except StopIteration:
                self._exhausted = True
                self._flush()
                self._window_state = self._parent.get_state()
                continue
            if not self._place(ex):
                self._flush()
                self._window_state = before
                self._place(ex)
        self._emitted += 1
        return self._ready.popleft()

    def get_state(self) -> dict[str, Any]:
        if self._ready:
            return {"window": self._ready_state, "emitted": self._emitted}
        return {"window": self._window_state, "emitted": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["window"])
        self._window_state = state["window"]
        self._drop = int(state["emitted"])
        self._bins = []
        self._ready.clear()
        self._ready_state = None
        self._emitted = 0
        self._exhausted = False

    def __str__(self) -> str:
        return f"PackExamples(seq_len={self._seq_len}, tiles_per_row={self._tiles_per_row}, bins={self._num_bins})"


class PackExamples(grain.IterDataset):
    """First-fit packing of `transforms.Example`s into `Row`s (see module docstring).

    Args:
      parent: stream of examples, each fitting `seq_len` tokens and `tiles_per_row` tiles.
      seq_len: tokens per row (S).
      tiles_per_row: tile slots per row (T).
      num_bins: rows open at once (1 = next-fit; more packs tighter, reorders a little).
      pad_id: token id for padding.
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, tiles_per_row: int, num_bins: int, pad_id: int):
        super().__init__(parent)
        if seq_len < 1 or tiles_per_row < 1 or num_bins < 1:
            raise ValueError(f"need seq_len, tiles_per_row, num_bins >= 1; got {seq_len}, {tiles_per_row}, {num_bins}")
        self._seq_len = seq_len
        self._tiles_per_row = tiles_per_row
        self._num_bins = num_bins
        self._pad_id = pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._tiles_per_row, self._num_bins, self._pad_id)

    def __str__(self) -> str:
        return f"PackExamples(seq_len={self._seq_len}, tiles_per_row={self._tiles_per_row}, bins={self._num_bins})"


class BatchRows:
    """Stacks rows into a batch of the contract in `batch.py` (the `batch_fn` of the pipeline).

    A short final batch (finite streams only) is completed with empty rows (all padding, no
    loss, no valid tiles), so every batch has the same shapes. The batch also holds
    `STATS_KEY`: the per-source record counts of its rows (`DataIterator` pops it).

    In `mp_prefetch` workers grain calls `enable_shared_memory_output()`; `pixel_values` (by far
    the largest field) is then written straight into shared memory, saving a copy per batch.

    Args:
      batch_size: rows per batch (B).
      seq_len: tokens per row (S).
      tiles_per_row: tile slots per row (T).
      tile_size: tile edge in pixels.
      pad_id: token id of padding.
    """

    def __init__(self, *, batch_size: int, seq_len: int, tiles_per_row: int, tile_size: int, pad_id: int):
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.tiles_per_row = tiles_per_row
        self.tile_size = tile_size
        self.pad_id = pad_id
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        self._shared_memory = True

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        """Returns the contract's fields (`[B, S]` token fields, `pixel_values` float32
        `[B, T, tile_size, tile_size, 3]`, `tile_valid`/`tile_image` `[B, T]`) plus `STATS_KEY`."""
        b_size, t_size = self.batch_size, self.tiles_per_row
        if len(rows) > b_size:
            raise ValueError(f"{len(rows)} rows for a batch of {b_size}")
        empty = build_row([], seq_len=self.seq_len, pad_id=self.pad_id)
        rows = list(rows) + [empty] * (b_size - len(rows))
        batch: dict[str, Any] = {name: np.stack([r.tokens[name] for r in rows]) for name in _TOKEN_FIELDS}
        shape = (b_size, t_size, self.tile_size, self.tile_size, 3)
        if self._shared_memory:
            pixel_values = grain.multiprocessing.SharedMemoryArray(shape, np.float32)
        else:
            pixel_values = np.empty(shape, np.float32)
        tile_valid = np.zeros((b_size, t_size), bool)
        tile_image = np.full((b_size, t_size), -1, np.int32)
        stats: mixture.Counts = {}
        for b, row in enumerate(rows):
            if row.num_tiles > t_size:
                raise ValueError(f"row {b} has {row.num_tiles} tiles > tiles_per_row {t_size}")
            offset = 0
            for tiles in row.pixels:
                tiling.normalize_tiles(tiles, out=pixel_values[b, offset : offset + tiles.shape[0]])
                offset += tiles.shape[0]
            pixel_values[b, offset:] = 0.0
            tile_valid[b, : row.num_tiles] = True
            tile_image[b, : row.num_tiles] = row.tile_image
            mixture.merge_counts(stats, row.stats)
        batch.update(pixel_values=pixel_values, tile_valid=tile_valid, tile_image=tile_image)
        batch[STATS_KEY] = stats
        return batch

"""Copying one source tensor (or one block of it) into our layout without holding it twice:
block-wise `pread`s into a reusable buffer, cache-sized tiles for transposes, and for sharded
reads one `pread` per contiguous run of the block, so a process reads only its own share."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.lib.array_utils import byte_bounds

from nvlm_jax.safetensors_io import SafetensorsFile

# Large tensors are copied in blocks of about this many source bytes, read with `pread` into a
# reusable buffer, so a tensor never needs to be resident twice (its source and its copy).
READ_BLOCK_BYTES = 16 * 1024**2
# Transposing copies go through (_TILE x _TRANSPOSE_ROWS) tiles (measured best on a 2-core CPU).
_TILE = 128
_TRANSPOSE_ROWS = 256


def _as_2d_pair(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both arrays reshaped to 2-D (leading axes, trailing axes) at a split where neither needs
    a copy, or None."""
    for k in range(1, dst.ndim):
        try:
            d2 = dst.reshape(math.prod(dst.shape[:k]), -1, copy=False)
            s2 = src.reshape(math.prod(src.shape[:k]), -1, copy=False)
        except ValueError:
            continue
        return d2, s2
    return None


def _uint(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"u{np.dtype(dtype).itemsize}")


def copy_tensor(dst: np.ndarray, file: SafetensorsFile, key: str, view: Callable[[np.ndarray], np.ndarray]) -> None:
    """`dst[...] = view(tensor)` (with round-to-nearest-even casting), streaming the source.

    `view` must only reshape/transpose/slice (the weight-map transforms). When the result is a
    2-D strided view of the stored bytes (all transforms of large tensors are), the source is
    read in blocks of `READ_BLOCK_BYTES` along its storage order into one reusable buffer, and
    transposing copies go through cache-sized tiles (bit copies when the dtype is unchanged).
    Otherwise (small or irregular tensors) it is copied from a memory map.
    """
    mapped = file.tensor(key)  # only its layout is used on the streaming path
    src = view(mapped)
    if dst.nbytes <= READ_BLOCK_BYTES or dst.ndim < 2 or src.size == 0:
        dst[...] = src
        return
    base_lo, base_hi = byte_bounds(mapped)
    lo, hi = byte_bounds(src)
    pair = _as_2d_pair(dst, src) if base_lo <= lo and hi <= base_hi else None
    if pair is None or min(pair[1].strides) <= 0:
        dst[...] = src
        return
    d2, s2 = pair
    if dst.dtype == src.dtype:
        d2 = d2.view(_uint(dst.dtype))
    outer = 0 if s2.strides[0] >= s2.strides[1] else 1  # the axis that walks storage order
    step = max(_TILE, READ_BLOCK_BYTES // s2.strides[outer] // _TILE * _TILE)
    buf = np.empty(step * s2.strides[outer] + s2.strides[1 - outer] * s2.shape[1 - outer], np.uint8)
    read_dtype = _uint(src.dtype) if dst.dtype == src.dtype else src.dtype
    direct = (outer == 0 and dst.dtype == src.dtype and d2.flags.c_contiguous
              and s2.strides == (s2.shape[1] * s2.itemsize, s2.itemsize))
    for o0 in range(0, s2.shape[outer], step):
        block = s2[o0 : o0 + step] if outer == 0 else s2[:, o0 : o0 + step]
        b_lo, b_hi = byte_bounds(block)
        if direct:  # same layout and dtype: read straight into the destination
            file.read_range(key, b_lo - base_lo, d2[o0 : o0 + step])
            continue
        file.read_range(key, b_lo - base_lo, buf[: b_hi - b_lo])
        data = np.lib.stride_tricks.as_strided(buf[: b_hi - b_lo].view(read_dtype), block.shape, block.strides)
        if outer == 0:
            d2[o0 : o0 + step] = data
            continue
        for j in range(0, data.shape[1], _TRANSPOSE_ROWS):
            j1 = min(j + _TRANSPOSE_ROWS, data.shape[1])
            for i in range(0, s2.shape[0], _TILE):
                d2[i : i + _TILE, o0 + j : o0 + j1] = data[i : i + _TILE, j:j1]


# A block of an array: (start, stop) per axis.
Bounds = tuple[tuple[int, int], ...]


def _is_view_of(view: np.ndarray, base: np.ndarray) -> bool:
    """Whether `view` lies inside `base`'s memory with positive strides on its non-trivial axes
    (what `_storage_runs` needs)."""
    lo, hi = byte_bounds(view)
    base_lo, base_hi = byte_bounds(base)
    return base_lo <= lo and hi <= base_hi and all(s > 0 for s, n in zip(view.strides, view.shape, strict=True)
                                                   if n > 1)


def _storage_runs(view: np.ndarray, base: np.ndarray) -> tuple[tuple[int, ...], np.ndarray, int]:
    """How to read a strided `view` of `base` (a tensor's bytes) as a list of contiguous runs.

    Returns `(order, starts, run_bytes)`: `view.transpose(order)` walks storage order (axes by
    decreasing stride); its trailing axes that are contiguous form runs of `run_bytes`, which
    start at byte offsets `starts` (from `base`'s first byte) in C order of the leading axes.
    E.g. a column block [r0:r1, c0:c1] of a row-major matrix is r1 - r0 runs of a row piece each.
    """
    order = tuple(sorted(range(view.ndim), key=lambda a: (view.shape[a] > 1, -view.strides[a])))
    shape = [view.shape[a] for a in order]
    strides = [view.strides[a] for a in order]
    inner, run_bytes = view.ndim, view.itemsize
    while inner > 0 and (shape[inner - 1] == 1 or strides[inner - 1] == run_bytes):
        run_bytes *= shape[inner - 1]
        inner -= 1
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    starts = np.full(1, offset, np.int64)
    for size, stride in zip(shape[:inner], strides[:inner], strict=True):
        starts = (starts[:, None] + np.arange(size, dtype=np.int64) * stride).reshape(-1)
    return order, starts, run_bytes


def read_strided(file: SafetensorsFile, key: str, view: np.ndarray, base: np.ndarray) -> np.ndarray:
    """`np.array(view)` for a strided view of tensor `key`'s memory map `base`, read with one
    `pread` per contiguous run: only the bytes the view covers are read (the map is never
    touched), so a process reading its shard of a tensor reads just that share."""
    order, starts, run_bytes = _storage_runs(view, base)
    buf = np.empty(tuple(view.shape[a] for a in order), view.dtype)
    file.read_runs(key, starts, run_bytes, buf.reshape(-1).view(np.uint8))
    return buf.transpose(np.argsort(order))



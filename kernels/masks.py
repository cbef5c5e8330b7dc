"""From a mask description to what a blocked attention kernel needs.

A `MaskSpec` (nvlm_jax/models/attention.py) says which keys each query sees through per-token
ids: segment ids (0 = padding), positions (with `causal`), and the NVLM-X/H cross-attention ids
(q_image/q_tile/kv_image/kv_tile). This module turns it into

- a static `MaskLayout` (which rules apply, true lengths) and packed int32 id arrays, padded to
  whole blocks (`pack_ids`);
- the element predicate `visible`, the one definition of "query i sees key j" used inside every
  kernel backend and by the tests;
- a block map [batch, q_blocks, kv_blocks] with 0 = no visible element (skip the block),
  1 = some visible (apply the element mask), 2 = all visible (no element mask), computed in plain
  JAX from per-block min/max summaries of the ids (`block_map`); it is conservative: a block is
  0 only when no element of it is visible, 2 only when every element is;
- compacted per-row lists of the non-empty blocks, which the kernels loop over (`block_lists`).

Padding: ids are padded by repeating the last real token's ids (so padding never widens a block's
id ranges), and the key-length rule `kv_index < kv_len` hides padded keys. Padded query rows are
computed like the last real row and sliced off by the caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

FIELDS = ("segment", "position", "image", "tile")
_BIG = 2**30  # beyond any id or position; used as the neutral element of masked min/max


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """The static part of a mask: which rules apply and the true (unpadded) lengths.

    segments: same non-zero segment id; causal: kv_position <= q_position; cross: the NVLM-X/H
    tile/image rule; causal_by_index: kv_index <= q_index + (kv_len - q_len), the promise of
    `MaskSpec.causal_by_index` (with the offset of the XLA path's key truncation): where the
    promise holds the other rules already imply it, so it changes nothing but lets blocks above
    the diagonal be skipped. The key-length rule kv_index < kv_len always applies.
    """

    segments: bool
    causal: bool
    cross: bool
    causal_by_index: bool
    q_len: int
    kv_len: int

    @classmethod
    def from_spec(cls, spec: Any, q_len: int, kv_len: int) -> MaskLayout:
        cross_fields = (spec.q_image, spec.q_tile, spec.kv_image, spec.kv_tile)
        cross = any(x is not None for x in cross_fields)
        if cross and not all(x is not None for x in cross_fields):
            raise ValueError("the cross-attention rule needs all of q_image, q_tile, kv_image, kv_tile")
        segments = spec.q_segment_ids is not None or spec.kv_segment_ids is not None
        # Every kernel input list needs at least one id field; a maskless call carries all-ones
        # segment ids (cheap: [batch, len] int32) and the block map marks its blocks fully visible.
        if not (segments or spec.causal or cross):
            segments = True
        return cls(segments=segments, causal=bool(spec.causal), cross=cross,
                   causal_by_index=bool(spec.causal_by_index), q_len=q_len, kv_len=kv_len)

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the packed id fields, in packing order."""
        used = {"segment": self.segments, "position": self.causal, "image": self.cross, "tile": self.cross}
        return tuple(name for name in FIELDS if used[name])


def _pad_edge(x: jax.Array, length: int) -> jax.Array:
    """[batch, n] → [batch, length], repeating the last column."""
    n = x.shape[1]
    if length < n:
        raise ValueError(f"cannot pad ids of length {n} down to {length}")
    return x if length == n else jnp.pad(x, ((0, 0), (0, length - n)), mode="edge")


def pack_ids(spec: Any, layout: MaskLayout, batch: int, q_pad: int, kv_pad: int) -> tuple[jax.Array, jax.Array]:
    """The ids of `spec` as int32 `q_ids` [batch, q_pad, F] and `kv_ids` [batch, kv_pad, F].

    F = len(layout.fields). Absent ids take the `MaskSpec` defaults (segment 1, position arange).
    """
    s, t = layout.q_len, layout.kv_len

    def full(x, n, default):
        if x is None:
            x = default(n)
        x = jnp.asarray(x, jnp.int32)
        if x.ndim != 2 or x.shape[1] != n or x.shape[0] not in (1, batch):
            raise ValueError(f"mask ids must be [batch={batch}, {n}], got shape {x.shape}")
        return jnp.broadcast_to(x, (batch, n))

    ones = lambda n: jnp.ones((1, n), jnp.int32)  # noqa: E731
    arange = lambda n: jnp.arange(n, dtype=jnp.int32)[None]  # noqa: E731
    q_cols, kv_cols = [], []
    for name in layout.fields:
        if name == "segment":
            q, kv = full(spec.q_segment_ids, s, ones), full(spec.kv_segment_ids, t, ones)
        elif name == "position":
            q, kv = full(spec.q_positions, s, arange), full(spec.kv_positions, t, arange)
        elif name == "image":
            q, kv = full(spec.q_image, s, None), full(spec.kv_image, t, None)
        else:
            q, kv = full(spec.q_tile, s, None), full(spec.kv_tile, t, None)
        q_cols.append(_pad_edge(q, q_pad))
        kv_cols.append(_pad_edge(kv, kv_pad))
    return jnp.stack(q_cols, axis=-1), jnp.stack(kv_cols, axis=-1)


def visible(layout: MaskLayout, q: dict[str, jax.Array], kv: dict[str, jax.Array],
            q_index: jax.Array, kv_index: jax.Array) -> jax.Array:
    """Whether each query sees each key: the element predicate shared by all backends.

    `q[name]`, `q_index` and `kv[name]`, `kv_index` are int arrays that broadcast against each
    other (inside a kernel: a [block_q, 1] column against a [1, block_k] row, or transposed);
    indices are absolute token indices in the padded sequences. Returns a bool array.
    """
    ok = kv_index < layout.kv_len
    if layout.causal_by_index:
        ok = ok & (kv_index <= q_index + (layout.kv_len - layout.q_len))
    if layout.segments:
        ok = ok & (q["segment"] == kv["segment"]) & (kv["segment"] != 0)
    if layout.causal:
        ok = ok & (kv["position"] <= q["position"])
    if layout.cross:
        kv_real = kv["image"] >= 0
        own_tile = (kv["tile"] == q["tile"]) & kv_real
        earlier_images = kv_real & (kv["image"] <= q["image"])
        ok = ok & jnp.where(q["tile"] >= 0, own_tile, earlier_images)
    return ok


def dense_from_ids(layout: MaskLayout, q_ids: jax.Array, kv_ids: jax.Array) -> jax.Array:
    """The predicate over whole packed id arrays: bool [batch, q_pad, kv_pad] (tests, oracles)."""
    names = layout.fields
    q = {n: q_ids[:, :, i, None] for i, n in enumerate(names)}
    kv = {n: kv_ids[:, None, :, i] for i, n in enumerate(names)}
    q_index = jnp.arange(q_ids.shape[1])[None, :, None]
    kv_index = jnp.arange(kv_ids.shape[1])[None, None, :]
    return visible(layout, q, kv, q_index, kv_index)


def _blocked(x: jax.Array, block: int) -> jax.Array:
    """[batch, n * block] → [batch, n, block]."""
    b, n = x.shape
    if n % block:
        raise ValueError(f"ids of length {n} are not padded to a multiple of the block size {block}")
    return x.reshape(b, n // block, block)


def _min(x, where=None):
    return jnp.min(x if where is None else jnp.where(where, x, _BIG), axis=-1)


def _max(x, where=None):
    return jnp.max(x if where is None else jnp.where(where, x, -_BIG), axis=-1)


def block_map(layout: MaskLayout, q_ids: jax.Array, kv_ids: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """int32 [batch, q_blocks, kv_blocks]: 0 = nothing visible, 1 = partly, 2 = all visible.

    q_ids [batch, q_pad, F], kv_ids [batch, kv_pad, F] from `pack_ids`. Each rule of `visible`
    has a block-level version over per-block min/max summaries: "none" when the rule rejects
    every pair of the block, "all" when it accepts every pair. A block is 0 if any rule says
    none, 2 if every rule says all; the summaries only ever make a rule less certain, so the map
    is conservative.
    """
    nq, nk = q_ids.shape[1] // block_q, kv_ids.shape[1] // block_k
    qb = {n: _blocked(q_ids[..., i], block_q)[:, :, None, :] for i, n in enumerate(layout.fields)}
    kb = {n: _blocked(kv_ids[..., i], block_k)[:, None, :, :] for i, n in enumerate(layout.fields)}
    # The reductions below run over the last axis: q summaries are [b, nq, 1], kv [b, 1, nk].
    q_first = (jnp.arange(nq) * block_q)[:, None]  # [nq, 1] first query index of each block
    q_last = q_first + block_q - 1
    kv_first = (jnp.arange(nk) * block_k)[None, :]  # [1, nk]
    kv_last = kv_first + block_k - 1

    none = jnp.zeros((1, nq, nk), bool)
    every = (kv_last < layout.kv_len)[None]
    if layout.causal_by_index:
        offset = layout.kv_len - layout.q_len
        none = none | (kv_first > q_last + offset)[None]
        every = every & (kv_last <= q_first + offset)[None]
    if layout.segments:
        qs, ks = qb["segment"], kb["segment"]
        q_real, k_real = qs != 0, ks != 0
        disjoint = (_max(qs, q_real) < _min(ks, k_real)) | (_max(ks, k_real) < _min(qs, q_real))
        none = none | ~jnp.any(q_real, -1) | ~jnp.any(k_real, -1) | disjoint
        q_one, k_one = _min(qs) == _max(qs), _min(ks) == _max(ks)
        every = every & q_one & k_one & (_min(qs) == _min(ks)) & (_min(qs) != 0)
    if layout.causal:
        qp, kp = qb["position"], kb["position"]
        none = none | (_min(kp) > _max(qp))
        every = every & (_max(kp) <= _min(qp))
    if layout.cross:
        qi, qt, ki, kt = qb["image"], qb["tile"], kb["image"], kb["tile"]
        k_real, q_tag = ki >= 0, qt >= 0
        any_k = jnp.any(k_real, -1)
        # Tag rows see their own tile's keys; other rows see keys of images up to their own.
        tile_possible = (jnp.any(q_tag, -1) & any_k & (_min(qt, q_tag) <= _max(kt, k_real))
                         & (_min(kt, k_real) <= _max(qt, q_tag)))
        image_possible = jnp.any(~q_tag, -1) & any_k & (_min(ki, k_real) <= _max(qi, ~q_tag))
        none = none | ~(tile_possible | image_possible)
        one_tile = (_min(qt) >= 0) & (_min(qt) == _max(qt)) & (_min(kt) == _max(kt)) & (_min(qt) == _min(kt))
        all_earlier = (_max(qt) < 0) & (_max(ki) <= _min(qi))
        every = every & (_min(ki) >= 0) & (one_tile | all_earlier)
    b = q_ids.shape[0]
    none, every = jnp.broadcast_to(none, (b, nq, nk)), jnp.broadcast_to(every, (b, nq, nk))
    return jnp.where(none, 0, jnp.where(every, 2, 1)).astype(jnp.int32)


def block_lists(kinds: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Compacts a block map along its last axis, for kernels that loop over non-empty blocks.

    kinds: int [batch, rows, cols] (a block map, or its transpose for loops over query blocks).
    Returns (index, kind, count): index/kind [batch, rows, cols] list the blocks with kind != 0
    first, in increasing column order (the tail repeats skipped blocks and is never read);
    count [batch, rows] is how many there are.
    """
    order = jnp.argsort(kinds == 0, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.take_along_axis(kinds, order, axis=-1), jnp.sum(kinds != 0, axis=-1, dtype=jnp.int32)


def skipped_fraction(kinds: jax.Array) -> float:
    """Fraction of (query block, key block) pairs that a kernel skips entirely."""
    return float(jnp.mean(kinds == 0))

"""The one attention function of the project, and the mask description it takes.

Masks are described, never materialised by callers: `causal`, segment ids (packed sequences,
padding, unfilled KV-cache slots) and positions. The XLA path below builds the dense mask from
the description; the Pallas kernel (`kernels/tile_attention.py`) derives block maps from the same
description. `attention(..., implementation=...)` dispatches between them and logs its choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import struct

from kernels import tile_attention as pallas_kernel
from nvlm_jax.models import matmul


@struct.dataclass
class MaskSpec:
    """Which keys each query may see.

    A query sees a key when both have the same segment id, the key's segment id is not 0
    (0 marks padding / empty cache slots), if `causal`, `kv_position <= q_position`, and, with
    image/tile ids, the cross-attention rule below holds.
    Segment ids default to all ones and positions to `arange`. Queries that see no key get a
    zero output (and zero gradients), never NaN.
    """

    causal: bool = struct.field(pytree_node=False, default=False)
    # Promise that a query never sees a key with a larger index (self-attention over contiguous
    # segments with positions increasing inside each). Lets implementations skip those blocks.
    causal_by_index: bool = struct.field(pytree_node=False, default=False)
    q_segment_ids: jax.Array | None = None  # [batch, q_len] int
    kv_segment_ids: jax.Array | None = None  # [batch, kv_len] int
    q_positions: jax.Array | None = None  # [batch, q_len] int
    kv_positions: jax.Array | None = None  # [batch, kv_len] int
    # Cross-attention rule of NVLM-X/H (all four or none): a query with q_tile >= 0 sees only
    # keys with kv_tile == q_tile; other queries see keys with 0 <= kv_image <= q_image.
    q_image: jax.Array | None = None  # [batch, q_len] int
    q_tile: jax.Array | None = None  # [batch, q_len] int
    kv_image: jax.Array | None = None  # [batch, kv_len] int, -1 = never visible
    kv_tile: jax.Array | None = None  # [batch, kv_len] int

    def rows(self, start: int, stop: int, kv_stop: int) -> MaskSpec:
        """The description for queries [start, stop) against keys [0, kv_stop)."""

        def cut(x, a, b):
            return None if x is None else x[:, a:b]

        q_pos, kv_pos = self.q_positions, self.kv_positions
        if self.causal and q_pos is None:
            q_pos = jnp.arange(stop)[None]  # index positions; sliced below
        if self.causal and kv_pos is None:
            kv_pos = jnp.arange(kv_stop)[None]
        return self.replace(
            q_segment_ids=cut(self.q_segment_ids, start, stop),
            kv_segment_ids=cut(self.kv_segment_ids, 0, kv_stop),
            q_positions=cut(q_pos, start, stop),
            kv_positions=cut(kv_pos, 0, kv_stop),
            q_image=cut(self.q_image, start, stop),
            q_tile=cut(self.q_tile, start, stop),
            kv_image=cut(self.kv_image, 0, kv_stop),
            kv_tile=cut(self.kv_tile, 0, kv_stop),
        )

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array | None:
        """The boolean mask `[batch, q_len, kv_len]`, or None when every query sees every key."""
        mask = None

        def both(m):
            return m if mask is None else mask & m

        if self.q_segment_ids is not None or self.kv_segment_ids is not None:
            q_seg = self.q_segment_ids
            kv_seg = self.kv_segment_ids
            if q_seg is None:
                q_seg = jnp.ones((batch, q_len), jnp.int32)
            if kv_seg is None:
                kv_seg = jnp.ones((batch, kv_len), jnp.int32)
            mask = both((q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0))
        if self.causal:
            q_pos = self.q_positions
            kv_pos = self.kv_positions
            if q_pos is None:
                q_pos = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
            if kv_pos is None:
                kv_pos = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
            mask = both(kv_pos[:, None, :] <= q_pos[:, :, None])
        if self.q_image is not None:
            q_tile, kv_tile = self.q_tile[:, :, None], self.kv_tile[:, None, :]
            kv_image = self.kv_image[:, None, :]
            own_tile = (kv_tile == q_tile) & (kv_image >= 0)
            earlier_images = (kv_image >= 0) & (kv_image <= self.q_image[:, :, None])
            mask = both(jnp.where(q_tile >= 0, own_tile, earlier_images))
        return mask


QUERY_CHUNK = 512
IMPLEMENTATIONS = ("xla", "auto", "pallas")
# "auto" keeps single-step decoding (a handful of queries) on XLA: the kernel pads queries to a
# 16-row block and gains nothing on a memory-bound step. A heuristic, not a measured crossover.
AUTO_MIN_QUERIES = 16
_LOGGED: set[str] = set()


def _log_once(message: str, warn: bool = False) -> None:
    """Logs each distinct dispatch decision once per process (calls are traced per shape)."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        (logging.warning if warn else logging.info)("attention: %s", message)


def _pallas_blocker(implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec) -> str | None:
    """Why the Pallas kernel should not run for this call (None: run it)."""
    if implementation == "auto":
        platform = jax.default_backend()
        if platform not in ("gpu", "tpu"):
            return f"platform {platform!r} has no compiled Pallas kernels (interpret mode is for tests)"
        if q.shape[1] < AUTO_MIN_QUERIES:
            return f"{q.shape[1]} queries (a decode step) stay on XLA below {AUTO_MIN_QUERIES}"
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:
            return f"a {mesh.size}-device mesh is active and the kernel has no partitioning rule"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    return pallas_kernel.unsupported_reason(q.shape, k.shape, v.shape, q.dtype, mask)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec,
    *,
    scale: float,
    implementation: str = "xla",
) -> jax.Array:
    """Grouped-query attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] with
    `heads % kv_heads == 0` (query head h uses kv head h // (heads // kv_heads), as in
    `repeat_kv`). Scores `q·k` are rounded to q's dtype, then multiplied by `scale` and
    soft-maxed in f32; probabilities are rounded back before the value product.
    Returns [batch, q_len, heads, head_dim].

    implementation: "xla" (the path below); "pallas" (`kernels.tile_attention`: compiled on
    GPU/TPU, interpret mode on CPU); "auto" (Pallas on GPU/TPU, XLA on CPU). "pallas" and "auto"
    fall back to XLA, with the reason logged, for shapes or settings the kernel does not support;
    each decision is logged once. The kernel's numerics are described in `kernels/tile_attention.py`
    (same rounding points; bf16 results differ from this path in the last bits).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not available; use one of {IMPLEMENTATIONS}"
        )
    shapes = f"q {tuple(q.shape)} {q.dtype}, kv {tuple(k.shape)}"
    if implementation != "xla":
        blocker = _pallas_blocker(implementation, q, k, v, mask)
        if blocker is None:
            backend, interpret = pallas_kernel.default_backend()
            _log_once(f"{implementation} -> pallas ({backend}{', interpret mode' if interpret else ''}) for {shapes}")
            mesh = jax.sharding.get_abstract_mesh()
            if not mesh.empty and mesh.size > 1:
                _log_once(f"pallas under a {mesh.size}-device mesh: the kernel has no partitioning rule, "
                          "so its operands are gathered onto every device", warn=True)
            return pallas_kernel.tile_attention(q, k, v, mask, scale=scale)
        _log_once(f"{implementation} -> xla for {shapes}: {blocker}", warn=implementation == "pallas")
    s, t = q.shape[1], k.shape[1]
    if s <= QUERY_CHUNK:
        return _attention_xla(q, k, v, mask, scale)
    # Long sequences: one query chunk at a time keeps the f32 score block cache-sized, and a
    # causal-by-index mask lets each chunk stop at its last query's index.
    outs = []
    for start in range(0, s, QUERY_CHUNK):
        stop = min(s, start + QUERY_CHUNK)
        kv_stop = stop + (t - s) if mask.causal_by_index else t
        sub = mask.rows(start, stop, kv_stop)
        outs.append(_attention_xla(q[:, start:stop], k[:, :kv_stop], v[:, :kv_stop], sub, scale))
    return jnp.concatenate(outs, axis=1)


def _attention_xla(q, k, v, mask: MaskSpec, scale: float) -> jax.Array:
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of kv heads {kvh}")
    g = h // kvh
    # Head-major layouts make each (batch, head) score block one contiguous matmul. Repeated K/V
    # are never materialised: the group axis g rides along with the query rows.
    qh = q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, s, d]
    kh = k.transpose(0, 2, 3, 1)  # [b, kvh, d, t]
    vh = v.transpose(0, 2, 1, 3)  # [b, kvh, t, d]
    # Scores are rounded to the input dtype (the reference's bf16 matmul), then scaled in f32.
    scores = matmul.einsum("bkgsd,bkdt->bkgst", qh, kh, q.dtype, q.dtype)
    scores = scores.astype(jnp.float32) * scale
    dense = mask.dense(b, s, t)
    if dense is not None:
        allowed = dense[:, None, None, :, :]  # [b, 1, 1, s, t]
        scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    if dense is not None:
        # Rows that see no key: keep exp() finite; their weights are all exactly zero.
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - jax.lax.stop_gradient(row_max))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # Softmax normalisation is applied after the value product: [s, d] instead of [s, t] work.
    out = matmul.einsum("bkgst,bktd->bkgsd", weights, vh, v.dtype, jnp.float32)
    nonempty = total > 0
    out = out * jnp.where(nonempty, 1.0 / jnp.where(nonempty, total, 1.0), 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(q.dtype)

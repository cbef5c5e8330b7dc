"""The one attention function of the project, and the mask description it takes.

Masks are described, never materialised by callers: `causal`, segment ids (packed sequences,
padding, unfilled KV-cache slots) and positions. The XLA path below builds the dense mask from
the description; kernels (see `kernels/`) derive block maps from the same description.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class MaskSpec:
    """Which keys each query may see.

    A query sees a key when both have the same segment id, the key's segment id is not 0
    (0 marks padding / empty cache slots), and, if `causal`, `kv_position <= q_position`.
    Segment ids default to all ones and positions to `arange`. Queries that see no key get a
    zero output (and zero gradients), never NaN.
    """

    causal: bool = struct.field(pytree_node=False, default=False)
    q_segment_ids: jax.Array | None = None  # [batch, q_len] int
    kv_segment_ids: jax.Array | None = None  # [batch, kv_len] int
    q_positions: jax.Array | None = None  # [batch, q_len] int
    kv_positions: jax.Array | None = None  # [batch, kv_len] int

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
        return mask


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
    """
    if implementation not in ("xla", "auto"):
        raise ValueError(
            f"attention implementation {implementation!r} is not available; use 'xla' or 'auto'"
        )
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of kv heads {kvh}")
    g = h // kvh
    qg = q.reshape(b, s, kvh, g, d)
    # Repeated K/V are never materialised: the group axis g rides along in the einsum.
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores.astype(q.dtype).astype(jnp.float32) * scale
    dense = mask.dense(b, s, t)
    if dense is not None:
        allowed = dense[:, None, None, :, :]  # [b, 1, 1, s, t]
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dense is not None:
        # A query with no visible key would otherwise average all values uniformly.
        probs = jnp.where(allowed.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum(
        "bkgst,btkd->bskgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.reshape(b, s, h, d).astype(q.dtype)

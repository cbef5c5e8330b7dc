"""The pure-JAX oracle for `kernels.tile_attention`: dense-mask softmax attention in float32.

Deliberately the most direct formulation (materialised [batch, heads, q_len, kv_len] scores,
repeated K/V for GQA, the dense mask from `MaskSpec.dense`) so that it is easy to trust. It
computes in float32 from the (upcast) inputs at highest matmul precision, with no intermediate
rounding, and returns q's dtype; the kernel and the XLA path round scores and probabilities to
the input dtype, so bf16 comparisons against this oracle need bf16 tolerances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask, *, scale: float) -> jax.Array:
    """q [batch, q_len, heads, d], k/v [batch, kv_len, kv_heads, d], mask a `MaskSpec`.

    Query head h uses kv head h // (heads // kv_heads). Rows that see no key return 0 (and get
    zero gradients). Returns [batch, q_len, heads, d] in q's dtype.
    """
    b, s, h, _ = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"query heads {h} are not a multiple of kv heads {kvh}")
    hi = jax.lax.Precision.HIGHEST
    kr = jnp.repeat(k.astype(jnp.float32), h // kvh, axis=2)
    vr = jnp.repeat(v.astype(jnp.float32), h // kvh, axis=2)
    scores = jnp.einsum("bshd,bthd->bhst", q.astype(jnp.float32), kr, precision=hi) * scale
    dense = mask.dense(b, s, t)
    allowed = jnp.ones((b, s, t), bool) if dense is None else dense
    allowed = allowed[:, None]  # [b, 1, s, t]
    row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.exp(jnp.where(allowed, scores - row_max, -jnp.inf))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bhst,bthd->bshd", probs, vr, precision=hi)
    return out.astype(q.dtype)

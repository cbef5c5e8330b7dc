"""Teacher-forced token statistics of logits against targets: the training loss and accuracy,
the held-out loss, and the log-likelihood of an answer (attribution maps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TokenStats:
    """Sums over the answer tokens of a batch: cross-entropy, correct argmax, count (f32)."""

    loss_sum: jax.Array
    correct: jax.Array
    count: jax.Array


def token_stats(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> TokenStats:
    """logits [B, S, V] (f32), targets [B, S] int, loss_mask [B, S] bool → summed TokenStats."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return TokenStats(
        loss_sum=jnp.sum((log_z - target_logit) * mask),
        correct=jnp.sum(correct * mask),
        count=jnp.sum(mask),
    )

"""Normalisation layers with the reference rounding order: f32 statistics, then the weight."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


def rms_normalize(x: jax.Array, eps: float, variance: jax.Array | None = None) -> jax.Array:
    """`x / sqrt(mean(x²) + eps)` computed in f32 and returned in f32.

    `variance` overrides the mean of squares (InternViT's q/k norm takes it over real heads only).
    """
    x32 = x.astype(jnp.float32)
    if variance is None:
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(variance + eps)


class RMSNorm(nn.Module):
    """Qwen2/InternViT RMSNorm: normalise in f32, cast to `dtype`, then multiply by the weight."""

    eps: float = 1e-6
    axes: Sequence[str | None] = ("norm",)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.constant(self.init_value), tuple(self.axes)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_normalize(x, self.eps).astype(self.dtype) * weight.astype(self.dtype)


class LayerNorm(nn.Module):
    """PyTorch LayerNorm semantics: statistics and affine in f32, one rounding at the end."""

    eps: float = 1e-5
    axes: Sequence[str | None] = ("norm",)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, tuple(self.axes)),
            shape, self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.axes)),
            shape, self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)

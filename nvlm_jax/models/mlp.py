"""SwiGLU feed-forward (decoder layers and cross-attention blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nvlm_jax.config import LoraConfig
from nvlm_jax.models.linear import Linear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None  # adapters on all three projections

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        gate = Linear(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **dense)(x)
        up = Linear(self.intermediate_size, ("embed", "mlp"), name="up_proj", **dense)(x)
        h = nn.silu(gate) * up
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Linear(self.hidden_size, ("mlp", "embed"), name="down_proj", **dense)(h)

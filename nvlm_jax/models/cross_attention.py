"""Gated cross-attention blocks of NVLM-X/H and the memory mask built from tile/image ids.

Block (Flamingo-style, without a resampler, as the paper describes):
    x += tanh(attn_gate) * o_proj(xattn(RMSNorm(x), memory))
    x += tanh(ffn_gate)  * SwiGLU(RMSNorm(x))
with both gates initialised to 0, so an untrained block is exactly the identity. The cross
attention is GQA with its own q/k/v/o projections (no biases).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nvlm_jax.config import LLMConfig
from nvlm_jax.models.attention import MaskSpec, attention
from nvlm_jax.models.linear import Linear
from nvlm_jax.models.mlp import MLP
from nvlm_jax.models.norms import RMSNorm


class GatedCrossAttention(nn.Module):
    cfg: LLMConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"

    def setup(self):
        c = self.cfg
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.attn_norm = RMSNorm(eps=c.rms_norm_eps, **dense)
        self.ffn_norm = RMSNorm(eps=c.rms_norm_eps, **dense)
        self.q_proj = Linear((c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"), **dense)
        self.k_proj = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), **dense)
        self.v_proj = Linear((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), **dense)
        self.o_proj = Linear(c.hidden_size, ("q_heads", "head_dim", "embed"), in_dims=2, **dense)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, **dense)
        gate = nn.with_logical_partitioning(nn.initializers.zeros, ())
        self.attn_gate = self.param("attn_gate", gate, (), self.param_dtype)
        self.ffn_gate = self.param("ffn_gate", gate, (), self.param_dtype)

    def memory_kv(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """memory [batch, M, embed] → keys, values [batch, M, kv_heads, head_dim].

        Separate from `__call__` so generation computes them once per prompt."""
        return self.k_proj(memory), self.v_proj(memory)

    def __call__(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec) -> jax.Array:
        """x: [batch, seq, embed]; k, v: from `memory_kv`. Returns x after the gated block."""
        q = self.q_proj(self.attn_norm(x))
        o = attention(q, k, v, mask, scale=self.cfg.head_dim**-0.5, implementation=self.attention_impl)
        x = x + jnp.tanh(self.attn_gate.astype(jnp.float32)).astype(self.dtype) * self.o_proj(o)
        h = self.mlp(self.ffn_norm(x))
        x = x + jnp.tanh(self.ffn_gate.astype(jnp.float32)).astype(self.dtype) * h
        return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))

    def init_all(self, x: jax.Array, memory: jax.Array) -> jax.Array:
        """Touches every parameter (used to initialise the block)."""
        k, v = self.memory_kv(memory)
        return self(x, k, v, MaskSpec())


def cross_attention_mask(
    token_image: jax.Array, token_tile: jax.Array, memory_image: jax.Array, memory_tile: jax.Array
) -> MaskSpec:
    """Which memory tokens each decoder token sees (NVLM-X/H rule).

    token_image [b, s]: latest image started at/before the token (-1: none);
    token_tile [b, s]: the tile slot a tile-tag token names (-1: not a tag);
    memory_image [b, M]: image of each memory token (-1: padding / not attendable);
    memory_tile [b, M]: tile slot of each memory token.
    A tag token of tile k sees only tile k's memory; any other token sees every memory token of
    the images at or before its own image; nothing else.
    """
    return MaskSpec(q_image=token_image, q_tile=token_tile, kv_image=memory_image, kv_tile=memory_tile)

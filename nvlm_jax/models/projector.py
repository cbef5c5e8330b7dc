"""Pixel shuffle (ViT grid → fewer, wider tokens) and the vision → LLM projector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nvlm_jax.config import LoraConfig, ProjectorConfig
from nvlm_jax.models.linear import Linear
from nvlm_jax.models.norms import LayerNorm


def pixel_shuffle(x: jax.Array, scale: int = 2, version: str = "v2") -> jax.Array:
    """[tiles, g·g, C] (CLS dropped, row-major grid) → [tiles, (g/s)², s²·C].

    v2 (NVLM): output token `(g/s)·i + j` holds grid cells (s·i + r, s·j + c) for r, c in
    0..s-1, channel block `s·r + c`. v1 is the same with the token grid transposed (`(g/s)·j + i`).
    """
    t, n, c = x.shape
    g = int(round(n**0.5))
    if g * g != n or g % scale:
        raise ValueError(f"pixel_shuffle: {n} tokens are not a square grid divisible by {scale}")
    h = g // scale
    x = x.reshape(t, h, scale, h, scale, c)  # [t, i, r, j, c_, C]
    if version == "v2":
        x = x.transpose(0, 1, 3, 2, 4, 5)  # [t, i, j, r, c_, C]
    elif version == "v1":
        x = x.transpose(0, 3, 1, 2, 4, 5)  # [t, j, i, r, c_, C]
    else:
        raise ValueError(f"pixel_shuffle version must be v1 or v2, got {version!r}")
    return x.reshape(t, h * h, scale * scale * c)


class Projector(nn.Module):
    """2 layers (NVLM-D/H `mlp1`): LayerNorm → Linear → exact GELU → Linear, no biases.
    1 layer (NVLM-X): a single Linear."""

    cfg: ProjectorConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraConfig | None = None  # adapters on its linear layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.num_layers == 1:
            return Linear(c.output_size, ("proj_in", "embed"), name="fc", lora=self.lora, **dense)(x)
        x = LayerNorm(eps=c.norm_eps, axes=("proj_in",), name="norm", **dense)(x)
        x = Linear(c.hidden_size, ("proj_in", "proj_hidden"), name="fc1", lora=self.lora, **dense)(x)
        x = nn.gelu(x, approximate=False)
        return Linear(c.output_size, ("proj_hidden", "embed"), name="fc2", lora=self.lora, **dense)(x)

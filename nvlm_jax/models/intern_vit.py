"""InternViT as used by NVLM: patch embedding + CLS + learned positions, pre-norm blocks with
layer scale, fused-qkv attention with optional zero dummy heads and full-width QK-norm.

Input tiles are channels-last `[tiles, H, W, 3]`; output `[tiles, 1 + (H/p)·(W/p), hidden]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nvlm_jax.config import LoraConfig, VisionConfig
from nvlm_jax.models import matmul
from nvlm_jax.models.attention import MaskSpec, attention
from nvlm_jax.models.linear import Linear
from nvlm_jax.models.norms import LayerNorm, RMSNorm, rms_normalize
from nvlm_jax.models.remat import remat_policy


def _zero_dummy_heads(init, num_real: int, head_axis: int):
    """Wraps an initializer so that heads `num_real..` of `head_axis` start (and stay) exactly 0."""

    def wrapped(key, shape, dtype=jnp.float32):
        w = init(key, shape, dtype)
        idx = [slice(None)] * len(shape)
        idx[head_axis] = slice(num_real, None)
        return w.at[tuple(idx)].set(0)

    return wrapped


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    lora: LoraConfig | None = None  # adapters on every linear layer (qkv, proj, fc1, fc2)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        heads, real, d = c.total_heads, c.num_heads, c.head_dim
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2, 3))
        qkv = Linear(
            (3, heads, d), ("vit_embed", "vit_qkv", "vit_heads", "vit_head_dim"),
            use_bias=c.qkv_bias, fused_bias=False, name="qkv", lora=self.lora,
            kernel_init=_zero_dummy_heads(qkv_init, real, 2), **dense,
        )(x)  # [tiles, n, 3, heads, d]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if c.qk_normalization:
            q = self._qk_norm(q, "q_norm")
            k = self._qk_norm(k, "k_norm")
        # The reference scales q before the score matmul (bf16 rounding order).
        q = (q * d**-0.5).astype(self.dtype)
        o = attention(q, k, v, MaskSpec(), scale=1.0, implementation=self.attention_impl)
        if heads > real:
            # Dummy heads carry nothing: their zero weights make this exact for the release, and it
            # keeps them inert when their weights move (LoRA adapters, full training).
            o = jnp.where((jnp.arange(heads) < real)[None, None, :, None], o, jnp.zeros((), o.dtype))
        proj_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        return Linear(
            c.hidden_size, ("vit_heads", "vit_head_dim", "vit_embed"), in_dims=2, use_bias=True,
            fused_bias=False, name="proj", lora=self.lora, kernel_init=_zero_dummy_heads(proj_init, real, 0), **dense,
        )(o)

    def _qk_norm(self, x: jax.Array, name: str) -> jax.Array:
        """RMSNorm over all heads' concatenated width; the variance covers real heads only."""
        c = self.cfg
        heads, real, d = c.total_heads, c.num_heads, c.head_dim
        weight = self.param(
            name,
            nn.with_logical_partitioning(
                _zero_dummy_heads(nn.initializers.ones, real, 0), ("vit_heads", "vit_head_dim")
            ),
            (heads, d),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        var = jnp.sum(jnp.square(x32[:, :, :real]), axis=(2, 3), keepdims=True) / (real * d)
        return rms_normalize(x32, c.norm_eps, variance=var).astype(self.dtype) * weight.astype(self.dtype)


class VisionLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    lora: LoraConfig | None = None  # adapters on every linear layer (qkv, proj, fc1, fc2)

    @nn.compact
    def __call__(self, x: jax.Array, layer_index: jax.Array):
        c = self.cfg
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def norm(name):
            if c.norm_type == "rms_norm":
                return RMSNorm(eps=c.norm_eps, axes=("vit_embed",), name=name, **dense)
            return LayerNorm(eps=c.norm_eps, axes=("vit_embed",), name=name, **dense)

        def layer_scale(name):
            return self.param(
                name,
                nn.with_logical_partitioning(nn.initializers.constant(c.layer_scale_init), ("vit_embed",)),
                (c.hidden_size,),
                self.param_dtype,
            ).astype(self.dtype)

        attn = VisionAttention(c, self.dtype, self.param_dtype, self.attention_impl, self.lora, name="attn")
        h = attn(norm("norm1")(x))
        y = x + layer_scale("ls1") * h
        mlp = dict(use_bias=True, fused_bias=False, lora=self.lora, **dense)
        h = Linear(c.intermediate_size, ("vit_embed", "vit_mlp"), name="fc1", **mlp)(norm("norm2")(y))
        h = nn.gelu(h, approximate=False)
        h = Linear(c.hidden_size, ("vit_mlp", "vit_embed"), name="fc2", **mlp)(h)
        y = y + layer_scale("ls2") * h
        y = nn.with_logical_constraint(y, ("activation_tiles", "activation_length", "activation_embed"))
        if c.layers_used < c.num_layers:
            # Layers past `select_layer` exist in the checkpoint but must not change the output.
            y = jnp.where(layer_index < c.layers_used, y, x)
        return y, None


class InternViT(nn.Module):
    """The vision encoder. `__call__(pixels [tiles, H, W, C]) -> [tiles, tokens, hidden]`."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    lora: LoraConfig | None = None  # adapters on every linear layer (qkv, proj, fc1, fc2)
    remat: str = "none"

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.cfg
        t, hgt, wid, ch = pixels.shape
        p = c.patch_size
        if ch != c.num_channels or hgt % p or wid % p:
            raise ValueError(
                f"pixel tiles of shape {pixels.shape} do not fit the vision encoder "
                f"({c.num_channels} channels, patch {p})"
            )
        gh, gw = hgt // p, wid // p
        if (gh, gw) != (c.grid_size, c.grid_size) and not c.interpolate_pos_embed:
            raise ValueError(
                f"tiles are {hgt}x{wid} px but the vision encoder expects {c.image_size}x{c.image_size} "
                "(set interpolate_pos_embed=True to resize the position table)"
            )
        kernel = self.param(
            "patch_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=3),
                (None, None, None, "vit_embed"),
            ),
            (p, p, c.num_channels, c.hidden_size),
            self.param_dtype,
        )
        bias = self.param(
            "patch_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vit_embed",)),
            (c.hidden_size,), self.param_dtype,
        )
        cls = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vit_embed",)),
            (c.hidden_size,), self.param_dtype,
        )
        pos = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vit_positions", "vit_embed")),
            (c.num_positions, c.hidden_size),
            self.param_dtype,
        )
        # A stride-p conv is a matmul over non-overlapping patches, flattened (ky, kx, channel)
        # to match the HWIO kernel layout; patch index = row * gw + col as in the reference.
        patches = pixels.astype(self.dtype).reshape(t, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(t, gh * gw, p * p * ch)
        x = matmul.einsum("tnk,kc->tnc", patches, kernel.reshape(p * p * ch, c.hidden_size), self.dtype, jnp.float32)
        x = (x + bias.astype(jnp.float32)).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (t, 1, c.hidden_size)), x], axis=1)
        x = x + self._positions(pos, gh, gw).astype(self.dtype)[None]
        x = nn.with_logical_constraint(x, ("activation_tiles", "activation_length", "activation_embed"))

        layer = VisionLayer
        if self.remat != "none":
            layer = nn.remat(VisionLayer, policy=remat_policy(self.remat), prevent_cse=False)
        x, _ = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=0,
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "vit_layers"},
        )(c, self.dtype, self.param_dtype, self.attention_impl, self.lora, name="layers")(
            x, jnp.arange(c.num_layers)
        )
        return x

    def _positions(self, pos: jax.Array, gh: int, gw: int) -> jax.Array:
        """The position table for a gh×gw grid: bicubic-resized (f32, CLS row kept) if needed."""
        g = self.cfg.grid_size
        if (gh, gw) == (g, g):
            return pos
        grid = pos[1:].astype(jnp.float32).reshape(g, g, -1)
        grid = jax.image.resize(grid, (gh, gw, grid.shape[-1]), method="bicubic")
        return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(gh * gw, -1)], axis=0)

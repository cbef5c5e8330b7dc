"""A dense layer over several trailing/leading dims, with logical axis names on its parameters."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from nvlm_jax.config import LoraConfig
from nvlm_jax.models import matmul, quantize


class Linear(nn.Module):
    """`y = x · W (+ b)`, contracting the last `in_dims` axes of x with the first of W.

    `fused_bias=True` adds the bias before rounding to `dtype` (PyTorch `F.linear`);
    `False` rounds the product first and adds the bias in `dtype` (the InternViT reference,
    which does the matmul and the bias add as two bf16 ops).

    `lora` (rank > 0) adds a low-rank adapter: params `lora_a [in..., rank]` and
    `lora_b [rank, out...]` (logical axis "lora_rank" between the kernel's), and
    `y += (alpha / rank) * dropout(x) · A · B` before rounding and bias, so B = 0 gives exactly
    the base layer. Dropout runs only when a "dropout" RNG is given (training).
    """

    features: int | Sequence[int]
    kernel_axes: Sequence[str | None]
    in_dims: int = 1
    use_bias: bool = False
    fused_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer | None = None
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_shape = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel_shape = in_shape + out_shape
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}"
            )
        init = self.kernel_init or nn.initializers.variance_scaling(
            1.0,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(range(self.in_dims)),
            out_axis=tuple(range(self.in_dims, len(kernel_shape))),
        )
        if quantize.is_quantized(self):  # int8/int4 weights (see `quantize`): kernel_q + kernel_scale
            y = quantize.quantized_linear(self, x, kernel_shape, self.kernel_axes, self.in_dims, init, self.dtype)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                kernel_shape,
                self.param_dtype,
            )
            # The matmul's backward also runs in `dtype` (see `matmul`); f32 accumulation throughout.
            spec = matmul.linear_spec(x.ndim, self.in_dims, len(out_shape))
            y = matmul.einsum(spec, x, kernel, self.dtype, jnp.float32)
        if self.lora is not None and self.lora.rank:
            y = y + self._lora_delta(x, in_shape, out_shape)
        if not self.use_bias:
            return y.astype(self.dtype)
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.kernel_axes[self.in_dims :])),
            out_shape,
            self.param_dtype,
        )
        if self.fused_bias:
            return (y + bias.astype(jnp.float32)).astype(self.dtype)
        return y.astype(self.dtype) + bias.astype(self.dtype)

    def _lora_delta(self, x: jax.Array, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> jax.Array:
        """`(alpha / rank) * dropout(x) · A · B`, f32 [batch..., out...]."""
        r, axes = self.lora.rank, tuple(self.kernel_axes)
        # A as PyTorch PEFT: Kaiming-uniform over the fan-in; B zero so training starts at the base.
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(self.in_dims)),
                                                  out_axis=self.in_dims)
        a = self.param("lora_a", nn.with_logical_partitioning(a_init, axes[: self.in_dims] + ("lora_rank",)),
                       in_shape + (r,), jnp.dtype(self.lora.param_dtype))
        b_axes = ("lora_rank",) + axes[self.in_dims :]
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, b_axes), (r,) + out_shape,
                       jnp.dtype(self.lora.param_dtype))
        if self.lora.dropout and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.lora.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.lora.dropout), 0).astype(x.dtype)
        h = matmul.einsum(matmul.linear_spec(x.ndim, self.in_dims, 1), x, a, self.dtype, self.dtype)
        delta = matmul.einsum(matmul.linear_spec(h.ndim, 1, len(out_shape)), h, b, self.dtype, jnp.float32)
        return delta * self.lora.scale

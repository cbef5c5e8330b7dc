"""Weight-only quantization of `Linear` kernels: int8 with per-output-channel scales, int4 with
scales per group of (up to) 128 inputs.

A quantized Linear holds `kernel_q` (int8 / int4) and `kernel_scale` (float32) instead of
`kernel [in..., out...]`. `kernel_q` is stored out-major, `[out..., in...]` (the kernel's axes
and logical names moved: `out_major`), because that is the layout in which XLA:CPU turns a
one-row product into a single loop that reads the int8 weight once, converting as it goes
(measured: the 151,680 x 768 int8 lm_head at batch 1 in 3.7 ms against 129 ms in-major and
14.4 ms for float32; BUILD_NOTES); in-major, it wrote a float copy of the weight first. On GPU,
XLA fuses the convert into the matmul's operand in either layout. `in_major(kernel_q) ≈
kernel / scale`, the scale broadcast over tiles of the in-major kernel (a scale axis of size 1
covers the whole kernel axis, a scale axis of size k covers k equal tiles). The product
dequantizes inside the jit-compiled program (`quantized_product`): int8 multiplies by the
integers (exact in bf16) and scales the f32 result per output; int4 scales each group of the
weight first. No full-precision copy of a weight is ever stored.

Scale layouts (of the in-major kernel `[in..., out...]`):
  int8: `[1 x in_dims, out...]` (logical axes "quant_in" (then None), the kernel's out axes).
  int4: the last input axis split into groups of `gcd(size, 128)` inputs (logical axis
        "quant_groups"), the other input axes per index (their own logical axes), then out...

Conventions follow qwix (symmetric absmax calibration, bound qmax + 0.5, round half to even,
clip to the integer range), so `qwix.quantize` is the tests' oracle. The one quantizer works on
numpy (host-side streaming conversion, slab by slab) and on jax arrays (under jit).

Which params are quantized is decided by the model: `NVLM.init` and `NVLM.apply` run inside
`quantized_init(cfg.quantize)`, where every `Linear` being initialised declares `kernel_q` /
`kernel_scale` (flax re-runs the stacked layers' initializer on every apply to check shapes, so
apply needs the mode too); at apply time a Linear is quantized when its params hold `kernel_q`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn

MODES = ("int8", "int4")
GROUP_SIZE = 128
QUANT_LEAVES = ("kernel_q", "kernel_scale")
SCALE_DTYPE = np.float32
_QDTYPES = {"int8": np.dtype(np.int8), "int4": np.dtype(ml_dtypes.int4)}
_INIT_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("nvlm_quantized_init", default=None)


def check_mode(mode: str | None, what: str = "quantize") -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"{what} must be one of {MODES} or None, got {mode!r}")
    return mode


def qdtype(mode: str) -> np.dtype:
    return _QDTYPES[check_mode(mode)]


def mode_of(kernel_q) -> str:
    """"int8" or "int4" from a `kernel_q` array (or ShapeDtypeStruct)."""
    for mode, dt in _QDTYPES.items():
        if np.dtype(kernel_q.dtype) == dt:
            return mode
    raise ValueError(f"kernel_q has dtype {kernel_q.dtype}; expected one of {list(_QDTYPES.values())}")


@contextlib.contextmanager
def quantized_init(mode: str | None) -> Iterator[None]:
    """Inside, initialising a model (or a flax shape check of a stacked initializer during apply)
    makes every `Linear` declare quantized params of `mode` (None: plain kernels)."""
    token = _INIT_MODE.set(check_mode(mode))
    try:
        yield
    finally:
        _INIT_MODE.reset(token)


def scale_layout(kernel_shape: Sequence[int], kernel_axes: Sequence[str | None], in_dims: int, mode: str
                 ) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
    """`(scale shape, scale logical axes)` of a kernel `[in..., out...]` (see module doc)."""
    kernel_shape, kernel_axes = tuple(kernel_shape), tuple(kernel_axes)
    out_shape, out_axes = kernel_shape[in_dims:], kernel_axes[in_dims:]
    if check_mode(mode) == "int8":
        # logical names may not repeat within one array: further size-1 axes are unnamed
        return (1,) * in_dims + out_shape, ("quant_in",) + (None,) * (in_dims - 1) + out_axes
    last = kernel_shape[in_dims - 1]
    groups = last // math.gcd(last, GROUP_SIZE)
    return (kernel_shape[: in_dims - 1] + (groups,) + out_shape,
            kernel_axes[: in_dims - 1] + ("quant_groups",) + out_axes)


def _tiles(shape: Sequence[int], scale_shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) != len(scale_shape) or any(s < 1 or n % s for n, s in zip(shape, scale_shape, strict=True)):
        raise ValueError(f"scale shape {tuple(scale_shape)} does not tile array shape {tuple(shape)}")
    return tuple(n // s for n, s in zip(shape, scale_shape, strict=True))


def _split(shape: Sequence[int], scale_shape: Sequence[int]) -> tuple[int, ...]:
    """`shape` with every axis n split into (scale size, tile size): `[s0, t0, s1, t1, ...]`."""
    return tuple(d for s, t in zip(scale_shape, _tiles(shape, scale_shape), strict=True) for d in (s, t))


def qmax(mode: str) -> int:
    """The largest integer of `mode` (its range is [-qmax - 1, qmax])."""
    return 127 if check_mode(mode) == "int8" else 7


def quantize_array(w, scale_shape: Sequence[int], mode: str, xp=np):
    """`(q, scale)` of `w` (any float dtype) with `scale` of `scale_shape` (float32); `xp` is
    numpy (host) or jax.numpy (under jit). |w - dequantize(q, scale)| <= scale / 2 everywhere."""
    top = qmax(mode)
    split = _split(w.shape, scale_shape)
    tile_axes = tuple(range(1, len(split), 2))
    w32 = w.astype(np.float32).reshape(split)
    absmax = xp.max(xp.abs(w32), axis=tile_axes, keepdims=True)
    scale = absmax / np.float32(top + 0.5)
    # An all-zero tile keeps scale 1 (as qwix): its values quantize to 0 either way.
    scale = xp.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale).astype(np.float32)
    q = xp.clip(xp.round(w32 / scale), -top - 1, top).astype(qdtype(mode))
    return q.reshape(w.shape), scale.reshape(tuple(scale_shape))


def out_major_order(ndim: int, in_dims: int, lead: int = 0) -> tuple[int, ...]:
    """The axis order taking `[lead..., in..., out...]` to `[lead..., out..., in...]`."""
    return tuple(range(lead)) + tuple(range(lead + in_dims, ndim)) + tuple(range(lead, lead + in_dims))


def out_major(a, in_dims: int, lead: int = 0):
    """`a [lead..., in..., out...]` as `[lead..., out..., in...]` (numpy or jax; a transposed view
    in numpy). `lead` counts stacked-layer axes, which stay first."""
    return a.transpose(out_major_order(a.ndim, in_dims, lead))


def in_major(a, in_dims: int, lead: int = 0):
    """Inverse of `out_major`: `[lead..., out..., in...]` as `[lead..., in..., out...]`."""
    return a.transpose(out_major_order(a.ndim, a.ndim - lead - in_dims, lead))


def dequantize(q, scale, dtype=jnp.float32):
    """`q * scale` of an in-major `q` (scale broadcast over its tiles) in `dtype`, as jax arrays."""
    split = _split(q.shape, scale.shape)
    w = q.astype(jnp.float32).reshape(split) * jnp.expand_dims(scale, tuple(range(1, len(split), 2)))
    return w.reshape(q.shape).astype(dtype)


SMALL_ROWS = 32  # int8 products with 2 to this many rows (decode) multiply and sum (see below)


def quantized_product(x: jax.Array, kernel_q: jax.Array, scale: jax.Array, in_dims: int, dtype) -> jax.Array:
    """`x [batch..., in...] · kernel` for the out-major `kernel_q [out..., in...]` and its
    scale, in `dtype` with f32 accumulation; returns f32 `[batch..., out...]`.

    How XLA:CPU reads the weight decides the speed (BUILD_NOTES, quantization; other backends
    always take the dot, whose operand conversion they fuse): one row is a dot that it runs as
    one loop over the int weight, converting as it reads, on `x` computed first
    (`computed_first`); up to `SMALL_ROWS` int8 rows, a multiply-and-sum over the weight's rows
    does the same for every row at once, on an `x` no other product shares (`unshared`; for int4
    it ran at half the dot's speed: measured, not used); a longer product (prefill) is a dot on
    the converted weight, its conversion shared by all rows. The CPU few-row paths multiply in
    f32 whatever `dtype` is (see below); for int4 the dequantized weight is then not rounded to
    `dtype` there, so a bf16 int4 decode step is slightly more precise than its prefill.
    """
    out_shape = kernel_q.shape[: kernel_q.ndim - in_dims]
    n, k = math.prod(out_shape), math.prod(kernel_q.shape[kernel_q.ndim - in_dims :])
    x2 = x.reshape(-1, k).astype(dtype)  # [m, k]
    f32 = jnp.float32
    if mode_of(kernel_q) == "int8":  # one scale per output: scale the product, not the weight
        w32 = kernel_q.reshape(n, k).astype(f32)
        w = kernel_q.reshape(n, k).astype(dtype)  # integers up to 128 are exact in bf16
        post = scale.reshape(n)
    else:  # int4: scales per group of inputs [in_lead..., groups, out...] -> [n, g]
        g = scale.size // n
        per_group = scale.reshape(g, n).T[:, :, None]
        w32 = (kernel_q.reshape(n, g, k // g).astype(f32) * per_group).reshape(n, k)
        w = w32.astype(dtype)
        post = None
    cpu, m = jax.default_backend() == "cpu", x2.shape[0]  # a GPU/TPU dot fuses the convert itself
    # On CPU, few-row products run in f32 from the f32 weight: for int8 these are the same exact
    # products of dtype values as a bf16 product's, and XLA:CPU converts to bf16 slowly (int8 with
    # bf16 activations: 164 ms a step against 10 ms in f32 on AVX2; BUILD_NOTES).
    if cpu and m == 1:
        y = jnp.dot(computed_first(x2).astype(f32), w32.T, preferred_element_type=f32)
    elif cpu and m <= SMALL_ROWS and post is not None:  # exact products of dtype values, summed in f32
        x2 = unshared(x2.astype(f32), post)
        y = jnp.sum(x2[:, None, :] * w32[None], axis=-1)
    else:
        y = jnp.dot(x2, w.T, preferred_element_type=f32)
    if post is not None:
        y = y * post
    return y.reshape(x.shape[: x.ndim - in_dims] + out_shape)


def is_quantized(module: nn.Module) -> bool:
    """Whether this Linear runs quantized: its params hold `kernel_q`, or it is being initialised
    inside `quantized_init`."""
    if module.has_variable("params", "kernel_q"):
        return True
    return module.is_initializing() and _INIT_MODE.get() is not None


def quantized_linear(module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...],
                     kernel_axes: Sequence[str | None], in_dims: int, kernel_init, dtype) -> jax.Array:
    """Declares `kernel_q` (out-major) / `kernel_scale` on `module` (a Linear) and returns its
    product with x (f32, `quantized_product`). A fresh init quantizes a fresh kernel."""
    if module.has_variable("params", "kernel"):
        raise ValueError(f"{module.name}: params hold both 'kernel' and 'kernel_q'")
    existing = module.has_variable("params", "kernel_q")
    mode = mode_of(module.get_variable("params", "kernel_q")) if existing else _INIT_MODE.get()
    scale_shape, scale_axes = scale_layout(kernel_shape, kernel_axes, in_dims, mode)
    order = out_major_order(len(kernel_shape), in_dims)
    q_shape, q_axes = tuple(kernel_shape[i] for i in order), tuple(kernel_axes[i] for i in order)

    # Both params come from one fresh kernel, so both inits take the same key (the rng flax hands
    # each init is its own); with existing params flax only traces them for a shape check.
    def fresh(_, key, which):
        q, scale = quantize_array(kernel_init(key, kernel_shape, jnp.float32), scale_shape, mode, xp=jnp)
        return out_major(q, in_dims) if which == 0 else scale

    key = jax.random.key(0) if existing else module.make_rng("params")
    q = module.param("kernel_q", nn.with_logical_partitioning(fresh, q_axes), key, 0)
    scale = module.param("kernel_scale", nn.with_logical_partitioning(fresh, scale_axes), key, 1)
    if q.shape != q_shape or q.dtype != qdtype(mode) or scale.shape != scale_shape:
        raise ValueError(f"{module.name}: quantized params kernel_q {q.shape} {q.dtype} / kernel_scale "
                         f"{scale.shape} do not fit a {mode} kernel {kernel_shape}: expected kernel_q {q_shape} "
                         f"(out-major) and scale {scale_shape}")
    return quantized_product(x, q, scale, in_dims, dtype)


def computed_first(x: jax.Array) -> jax.Array:
    """`x`, computed into its own buffer before the one-row product that reads it.

    XLA:CPU runs a one-row product as a loop over the weight's rows and fuses cheap elementwise
    producers of `x` into it, so they are recomputed for every output row: o_proj's input (the
    attention output, transposed and normalised) made its product 6x slower than q_proj's, the
    MLP's SwiGLU product made down_proj's 3x slower (BUILD_NOTES, quantized decode). XLA drops an
    optimization barrier, but never duplicates a division into a consumer that reuses its
    elements; `x / (x == x)` is `x` for every value (NaN stays NaN, infinities stay).
    """
    return x / (x == x).astype(x.dtype)


def unshared(x: jax.Array, scale: jax.Array) -> jax.Array:
    """`x` times 1, made to depend on this product's `scale` so that XLA cannot merge the
    broadcast of `x` with another product's: products reading the same input (k and v, gate and
    up) otherwise share one broadcast, which XLA:CPU materialises whole ([rows, out, in]: 120 ms
    for gate + up at 8 rows against 0.5 ms each unshared; BUILD_NOTES). Multiplying by
    `(s == s)` is exact (a NaN scale yields NaN outputs either way)."""
    s = scale.reshape(-1)[0]
    return x * (s == s).astype(x.dtype)

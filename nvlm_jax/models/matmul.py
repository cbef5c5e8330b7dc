"""Two-operand einsum for mixed precision whose backward pass runs at the forward's speed.

Why: the forward multiplies `compute_dtype` (bf16) operands with f32 accumulation. JAX's own
transpose of such a product multiplies the f32 cotangent with a bf16 operand, which XLA runs
as an f32 matmul: on bf16 hardware the backward then costs several times the forward. Here the
cotangent is rounded to `compute_dtype` first, as PyTorch autocast and Megatron do, so all three
products of a layer run in bf16 with f32 accumulation. Gradients come back in each operand's
own dtype without an intermediate bf16 rounding (f32 master weights get f32-accumulated grads).

With `compute_dtype=float32` every cast is a no-op and this is exactly `jnp.einsum`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, _, out = spec.replace(" ", "").partition("->")
    a, _, b = inputs.partition(",")
    if not out or not a or not b or "." in spec:
        raise ValueError(f"einsum spec must be explicit 'a,b->c' without ellipsis, got {spec!r}")
    for name, sub in (("first operand", a), ("second operand", b)):
        lonely = set(sub) - set(out) - set(a if sub is b else b)
        if lonely:  # such axes are summed inside one operand; their gradient is not an einsum
            raise ValueError(f"einsum {spec!r}: {name} has axes {sorted(lonely)} in no other term")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def einsum(spec: str, a: jax.Array, b: jax.Array, compute_dtype, out_dtype) -> jax.Array:
    """`jnp.einsum(spec, a, b)` with both operands cast to `compute_dtype`, accumulated in f32
    and returned as `out_dtype`; its VJP rounds the cotangent to `compute_dtype` (see module)."""
    return _forward(spec, a, b, compute_dtype, out_dtype)


def _forward(spec, a, b, compute_dtype, out_dtype):
    sa, sb, sout = _parse(spec)
    a, b = a.astype(compute_dtype), b.astype(compute_dtype)
    if _one_row_on_cpu(sa, sb, sout, a, compute_dtype):
        # XLA:CPU has no half-precision matrix-vector kernel: it converts the whole weight to f32
        # (for a stacked weight, every layer's, once per call) and multiplies in f32. Two rows go
        # to its bf16 matrix kernel: the 151,680 x 768 bf16 lm_head took 147 ms for one row
        # and 16 ms for two (BUILD_NOTES). The second row is zeros and is dropped.
        pad = next(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec)
        a2 = jnp.stack([a, jnp.zeros_like(a)])
        y = jnp.einsum(f"{pad}{sa},{sb}->{pad}{sout}", a2, b, preferred_element_type=jnp.float32)[0]
    else:
        y = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def _one_row_on_cpu(sa: str, sb: str, sout: str, a: jax.Array, compute_dtype) -> bool:
    """Whether this is a vector-matrix product (a's free axes hold one element, no batch axes) in
    a half-precision dtype on XLA:CPU."""
    if jnp.dtype(compute_dtype).itemsize != 2 or jax.default_backend() != "cpu":
        return False
    batch = set(sa) & set(sb) & set(sout)
    return not batch and all(n == 1 for c, n in zip(sa, a.shape, strict=True) if c not in sb)


def _fwd(spec, a, b, compute_dtype, out_dtype):
    return _forward(spec, a, b, compute_dtype, out_dtype), (a, b)


def _bwd(spec, compute_dtype, out_dtype, residuals, ct):
    a, b = residuals
    sa, sb, sout = _parse(spec)
    ct = ct.astype(compute_dtype)
    ac, bc = a.astype(compute_dtype), b.astype(compute_dtype)
    da = jnp.einsum(f"{sout},{sb}->{sa}", ct, bc, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{sout}->{sb}", ac, ct, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


einsum.defvjp(_fwd, _bwd)


def linear_spec(x_ndim: int, in_dims: int, out_dims: int) -> str:
    """The einsum of `x [batch..., in...] · W [in..., out...] -> [batch..., out...]`."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    if x_ndim + out_dims > len(letters):
        raise ValueError(f"too many axes for a linear einsum: {x_ndim} + {out_dims}")
    batch = letters[: x_ndim - in_dims]
    inner = letters[x_ndim - in_dims : x_ndim]
    out = letters[x_ndim : x_ndim + out_dims]
    return f"{batch}{inner},{inner}{out}->{batch}{out}"

"""The mixed-precision einsum: exact in f32, bf16 backward products, grads in operand dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvlm_jax.models import matmul

SPECS = ["abk,kn->abn", "bkgsd,bkdt->bkgst", "bkgst,bktd->bkgsd", "abk,knm->abnm"]
SHAPES = {
    "abk,kn->abn": ((2, 3, 8), (8, 5)),
    "bkgsd,bkdt->bkgst": ((2, 2, 3, 4, 8), (2, 2, 8, 6)),
    "bkgst,bktd->bkgsd": ((2, 2, 3, 4, 6), (2, 2, 6, 8)),
    "abk,knm->abnm": ((2, 3, 8), (8, 4, 2)),
}


def _operands(spec, dtype_a=jnp.float32, dtype_b=jnp.float32):
    sa, sb = SHAPES[spec]
    ka, kb = jax.random.split(jax.random.key(0))
    return jax.random.normal(ka, sa, dtype_a), jax.random.normal(kb, sb, dtype_b)


@pytest.mark.parametrize("spec", SPECS)
def test_f32_equals_jnp_einsum_values_and_grads(spec):
    a, b = _operands(spec)
    w = jax.random.normal(jax.random.key(1), jnp.einsum(spec, a, b).shape)

    def ours(a, b):
        return jnp.sum(w * matmul.einsum(spec, a, b, jnp.float32, jnp.float32))

    def ref(a, b):
        return jnp.sum(w * jnp.einsum(spec, a, b))

    np.testing.assert_array_equal(ours(a, b), ref(a, b))
    for g, r in zip(jax.grad(ours, (0, 1))(a, b), jax.grad(ref, (0, 1))(a, b), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_bf16_grads_round_the_cotangent_and_keep_operand_dtypes(spec):
    a, b = _operands(spec, jnp.bfloat16, jnp.float32)  # bf16 activations, f32 master weights
    ct = jax.random.normal(jax.random.key(2), jnp.einsum(spec, a, b).shape, jnp.float32)
    y, pullback = jax.vjp(lambda a, b: matmul.einsum(spec, a, b, jnp.bfloat16, jnp.float32), a, b)
    ref_y = jnp.einsum(spec, a, b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(y, ref_y)
    da, db = pullback(ct)
    assert da.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    # The f32 reference gradient, to bf16 accuracy.
    _, ref_pullback = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a.astype(jnp.float32), b)
    ref_da, ref_db = ref_pullback(ct)
    scale_a, scale_b = float(jnp.abs(ref_da).max()), float(jnp.abs(ref_db).max())
    np.testing.assert_allclose(np.asarray(da, np.float32), ref_da, atol=3e-2 * scale_a)
    np.testing.assert_allclose(db, ref_db, atol=3e-2 * scale_b)


def _dots(jaxpr) -> list:
    """Every dot_general equation, nested jaxprs (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found += _dots(getattr(sub, "jaxpr", sub) if not hasattr(sub, "eqns") else sub)
    return found


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str]]:
    return [tuple(str(v.aval.dtype) for v in eqn.invars) for eqn in _dots(jaxpr)]


def test_bf16_backward_has_only_bf16_products():
    """The reason the op exists: no f32 matmul in the backward of a bf16 layer."""
    spec = "abk,kn->abn"
    a, b = _operands(spec, jnp.bfloat16, jnp.float32)

    def loss(a, b):
        return jnp.sum(matmul.einsum(spec, a, b, jnp.bfloat16, jnp.float32) ** 2)

    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss, (0, 1)))(a, b).jaxpr)
    assert len(dots) == 3, dots  # forward, d_a, d_b
    assert all(d == ("bfloat16", "bfloat16") for d in dots), dots

    def plain(a, b):  # what JAX's own transpose would do: an f32 operand in the backward
        y = jnp.einsum(spec, a, b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return jnp.sum(y**2)

    plain_dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(plain, (0, 1)))(a, b).jaxpr)
    assert any("float32" in d for d in plain_dots), plain_dots


@pytest.mark.parametrize(
    "spec, message",
    [("ab,bc", "explicit"), ("...k,kn->...n", "ellipsis"), ("abk,kn->an", "in no other term")],
)
def test_bad_specs_are_named(spec, message):
    a, b = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    with pytest.raises(ValueError, match=message):
        matmul.einsum(spec, a, b, jnp.float32, jnp.float32)


def test_linear_spec():
    assert matmul.linear_spec(3, 1, 1) == "abc,cd->abd"
    assert matmul.linear_spec(4, 2, 2) == "abcd,cdef->abef"


def _dot_lhs_shapes(fn, *args) -> list[tuple[int, ...]]:
    return [tuple(e.invars[0].aval.shape) for e in _dots(jax.make_jaxpr(fn)(*args).jaxpr)]


def test_one_row_half_precision_products_run_as_two_rows_on_cpu():
    # XLA:CPU has no bf16 matrix-vector kernel (it converts the whole weight to f32): a one-row
    # product gets a zero second row, which is dropped again.
    assert jax.default_backend() == "cpu"
    spec = "abk,kn->abn"
    a = jax.random.normal(jax.random.key(0), (1, 1, 64), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (64, 48), jnp.bfloat16)

    def ours(a, b):
        return matmul.einsum(spec, a, b, jnp.bfloat16, jnp.float32)

    assert _dot_lhs_shapes(ours, a, b) == [(2, 1, 1, 64)]
    y = jax.jit(ours)(a, b)
    assert y.shape == (1, 1, 48) and y.dtype == jnp.float32
    want = np.einsum(spec, np.asarray(a, np.float32), np.asarray(b, np.float32))  # exact bf16 products
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # still differentiable: the padding row gets no gradient
    g = jax.grad(lambda a: jnp.sum(ours(a, b)))(a)
    np.testing.assert_allclose(np.asarray(g, np.float32)[0, 0], np.asarray(b, np.float32).sum(1), rtol=1e-2)
    # several rows, float32, and batched (attention) products are left alone
    assert _dot_lhs_shapes(ours, jnp.ones((2, 1, 64), jnp.bfloat16), b) == [(2, 1, 64)]
    assert _dot_lhs_shapes(lambda a, b: matmul.einsum(spec, a, b, jnp.float32, jnp.float32), a, b) == [(1, 1, 64)]
    q, k = jnp.ones((1, 1, 1, 1, 8), jnp.bfloat16), jnp.ones((1, 1, 8, 6), jnp.bfloat16)
    assert _dot_lhs_shapes(lambda q, k: matmul.einsum("bkgsd,bkdt->bkgst", q, k, jnp.bfloat16, jnp.float32),
                           q, k) == [(1, 1, 1, 1, 8)]

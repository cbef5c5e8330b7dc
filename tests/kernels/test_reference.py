"""The oracle `kernels.reference.attention_reference` against first principles and the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import reference
from nvlm_jax.models import attention as attention_module
from tests.kernels.test_masks import MASK_CASES, make_mask

# Jitted: eager dispatch would compile each small op of these tiny problems separately.
attention_reference = jax.jit(reference.attention_reference, static_argnames="scale")
attention = jax.jit(attention_module.attention, static_argnames=("scale", "implementation"))


def _qkv(b, s, t, h, kvh, d, dtype=jnp.float32, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, s, h, d), dtype), jax.random.normal(k2, (b, t, kvh, d), dtype),
            jax.random.normal(k3, (b, t, kvh, d), dtype))


def _sees(spec, r, i, j):
    """The MaskSpec rule for query i and key j of row r, written out scalar by scalar."""
    g = lambda x, n: None if x is None else int(x[r, n])  # noqa: E731
    if spec.q_segment_ids is not None or spec.kv_segment_ids is not None:
        qs, ks = g(spec.q_segment_ids, i), g(spec.kv_segment_ids, j)
        qs, ks = 1 if qs is None else qs, 1 if ks is None else ks
        if ks == 0 or qs != ks:
            return False
    if spec.causal:
        qp = i if spec.q_positions is None else g(spec.q_positions, i)
        kp = j if spec.kv_positions is None else g(spec.kv_positions, j)
        if kp > qp:
            return False
    if spec.q_image is not None:
        if g(spec.kv_image, j) < 0:
            return False
        if g(spec.q_tile, i) >= 0:
            return g(spec.kv_tile, j) == g(spec.q_tile, i)
        return g(spec.kv_image, j) <= g(spec.q_image, i)
    return True


def _loops(q, k, v, spec, scale):
    """Attention one query row at a time in float64 NumPy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    t, g = k.shape[1], h // k.shape[2]
    out = np.zeros((b, s, h, d))
    for r in range(b):
        for i in range(s):
            keys = [j for j in range(t) if _sees(spec, r, i, j)]
            for head in range(h):
                if not keys:
                    continue
                logits = np.array([q[r, i, head] @ k[r, j, head // g] for j in keys]) * scale
                w = np.exp(logits - logits.max())
                out[r, i, head] = (w / w.sum()) @ v[r, keys, head // g]
    return out


@pytest.mark.parametrize("case", MASK_CASES)
def test_reference_equals_row_by_row_attention_and_the_xla_path(case):
    b, s = 2, 11
    t = 16 if case == "cross" else (11 if case == "packed" else 13)
    q, k, v = _qkv(b, s, t, 6, 2, 8, seed=1)
    spec = make_mask(case, b, s, t, seed=1)
    got = np.asarray(attention_reference(q, k, v, spec, scale=0.4))
    np.testing.assert_allclose(got, _loops(q, k, v, spec, 0.4), atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(attention(q, k, v, spec, scale=0.4)), atol=2e-6)


def test_rows_that_see_nothing_are_zero_with_zero_gradients():
    q, k, v = _qkv(2, 11, 13, 4, 2, 8, seed=3)
    spec = make_mask("segments", 2, 11, 13, seed=0)
    empty = ~np.asarray(spec.dense(2, 11, 13)).any(-1)
    assert empty.any()
    out = attention_reference(q, k, v, spec, scale=0.5)
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    loss = lambda *a: reference.attention_reference(*a, spec, scale=0.5).sum()  # noqa: E731
    dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in (dq, dk, dv))
    np.testing.assert_array_equal(np.asarray(dq)[empty], 0.0)


def test_reference_returns_the_input_dtype():
    q, k, v = _qkv(1, 5, 5, 2, 1, 8, dtype=jnp.bfloat16)
    assert attention_reference(q, k, v, make_mask("causal", 1, 5, 5), scale=1.0).dtype == jnp.bfloat16

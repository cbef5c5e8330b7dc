"""Mask semantics of the one attention function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvlm_jax.models.attention import MaskSpec, attention


def _qkv(b=2, s=6, t=6, h=4, kvh=2, d=8, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, s, h, d)), jax.random.normal(k2, (b, t, kvh, d)),
            jax.random.normal(k3, (b, t, kvh, d)))


def _naive(q, k, v, allowed, scale):
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bshd,bthd->bhst", q, k) * scale
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(allowed[:, None].any(-1, keepdims=True), p, 0.0)
    return jnp.einsum("bhst,bthd->bshd", p, v)


def test_gqa_equals_repeated_kv_with_causal_mask():
    q, k, v = _qkv()
    out = attention(q, k, v, MaskSpec(causal=True), scale=0.3)
    allowed = jnp.tril(jnp.ones((6, 6), bool))[None].repeat(2, 0)
    np.testing.assert_allclose(out, _naive(q, k, v, allowed, 0.3), atol=1e-5)


def test_segments_and_padding():
    q, k, v = _qkv()
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    out = attention(q, k, v, MaskSpec(causal=True, q_segment_ids=seg, kv_segment_ids=seg), scale=0.3)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & jnp.tril(jnp.ones((6, 6), bool))
    np.testing.assert_allclose(out, _naive(q, k, v, allowed, 0.3), atol=1e-5)
    np.testing.assert_array_equal(out[0, 5], 0.0)  # the padding query sees nothing


def test_rows_with_nothing_to_see_give_zero_output_and_finite_gradients():
    q, k, v = _qkv()
    q_seg = jnp.asarray([[3, 3, 1, 1, 1, 1]] * 2)
    kv_seg = jnp.ones((2, 6), jnp.int32)
    mask = MaskSpec(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out = attention(q, k, v, mask, scale=0.5)
    np.testing.assert_array_equal(out[:, :2], 0.0)
    grads = jax.grad(lambda q, k, v: attention(q, k, v, mask, scale=0.5).sum(), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(grads[0][:, :2], 0.0)


def test_positions_drive_causality_for_cached_decoding():
    q, k, v = _qkv(s=1, t=6)
    kv_pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    q_pos = jnp.asarray([[3], [5]])
    out = attention(q, k, v, MaskSpec(causal=True, q_positions=q_pos, kv_positions=kv_pos), scale=0.3)
    allowed = kv_pos[:, None, :] <= q_pos[:, :, None]
    np.testing.assert_allclose(out, _naive(q, k, v, allowed, 0.3), atol=1e-5)


def test_unknown_implementation_is_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not available"):
        attention(q, k, v, MaskSpec(), scale=1.0, implementation="cuda")


@pytest.mark.parametrize("causal_by_index", [False, True])
def test_query_chunking_matches_one_block(monkeypatch, causal_by_index):
    from nvlm_jax.models import attention as attention_module

    q, k, v = _qkv(s=37, t=37)
    seg = jnp.asarray([[1] * 20 + [2] * 15 + [0] * 2, [1] * 37])
    pos = jnp.asarray([list(range(20)) + list(range(15)) + [0, 0], list(range(37))])
    mask = MaskSpec(causal=True, causal_by_index=causal_by_index, q_segment_ids=seg, kv_segment_ids=seg,
                    q_positions=pos, kv_positions=pos)
    whole = attention(q, k, v, mask, scale=0.3)
    monkeypatch.setattr(attention_module, "QUERY_CHUNK", 8)
    chunked = attention(q, k, v, mask, scale=0.3)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & (pos[:, None, :] <= pos[:, :, None])
    np.testing.assert_allclose(whole, _naive(q, k, v, allowed, 0.3), atol=1e-5)


# ---- the dispatcher: "xla" | "pallas" | "auto" ------------------------------------------------


@pytest.fixture
def dispatch_log(monkeypatch, caplog):
    """Fresh once-per-message memory, and the dispatcher's log lines as a list of strings."""
    import logging

    from nvlm_jax.models import attention as attention_module

    monkeypatch.setattr(attention_module, "_LOGGED", set())
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")]


def _fake_platform(monkeypatch, platform):
    # Only the decision is exercised: every call below must end on the XLA path, which runs on CPU.
    monkeypatch.setattr(jax, "default_backend", lambda: platform)


def test_auto_on_cpu_uses_xla_and_says_why_once(dispatch_log):
    q, k, v = _qkv(s=20, t=20)
    mask = MaskSpec(causal=True)
    out = attention(q, k, v, mask, scale=0.3, implementation="auto")
    attention(q, k, v, mask, scale=0.3, implementation="auto")
    np.testing.assert_array_equal(out, attention(q, k, v, mask, scale=0.3))
    lines = dispatch_log()
    assert len(lines) == 1 and "auto -> xla" in lines[0] and "platform 'cpu'" in lines[0], lines


def test_pallas_on_cpu_runs_the_kernel_in_interpret_mode_and_matches_xla(dispatch_log):
    q, k, v = _qkv(b=2, s=21, t=21, h=4, kvh=2, d=16)
    seg = jnp.asarray([[1] * 12 + [2] * 9, [1] * 19 + [0] * 2])
    pos = jnp.asarray([list(range(12)) + list(range(9)), list(range(21))])
    mask = MaskSpec(causal=True, causal_by_index=True, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                    kv_positions=pos)

    def run(impl):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, scale=0.25, implementation=impl)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (want, want_grads), (got, got_grads) = run("xla"), run("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    assert any("pallas -> pallas (triton, interpret mode)" in line for line in dispatch_log()), dispatch_log()


@pytest.mark.parametrize("shape, reason", [
    (dict(s=20, t=20, d=8), "head_dim 8"),  # Triton needs a power-of-two head_dim >= 16
    (dict(s=1, t=20, d=16), "decode step"),  # single-token decoding stays on XLA
])
def test_auto_on_gpu_falls_back_to_xla_with_a_reason(monkeypatch, dispatch_log, shape, reason):
    _fake_platform(monkeypatch, "gpu")
    q, k, v = _qkv(**shape)
    mask = MaskSpec(causal=True, q_positions=jnp.full((2, shape["s"]), 19))
    out = attention(q, k, v, mask, scale=0.3, implementation="auto")
    np.testing.assert_array_equal(out, attention(q, k, v, mask, scale=0.3))
    assert any("auto -> xla" in line and reason in line for line in dispatch_log()), dispatch_log()


def test_auto_on_gpu_falls_back_under_a_multi_device_mesh(monkeypatch, dispatch_log):
    _fake_platform(monkeypatch, "gpu")
    q, k, v = _qkv(s=32, t=32, d=16)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention(q, k, v, MaskSpec(), scale=0.3, implementation="auto"))(q, k, v)
    np.testing.assert_allclose(out, attention(q, k, v, MaskSpec(), scale=0.3), atol=1e-6)
    assert any("auto -> xla" in line and "2-device mesh" in line for line in dispatch_log()), dispatch_log()


def test_pallas_under_a_mesh_runs_and_warns_that_operands_are_gathered(dispatch_log):
    q, k, v = _qkv(s=32, t=32, d=16)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attention(q, k, v, MaskSpec(), scale=0.3, implementation="pallas"))(q, k, v)
    np.testing.assert_allclose(out, attention(q, k, v, MaskSpec(), scale=0.3), atol=1e-5)
    assert any("gathered" in line for line in dispatch_log()), dispatch_log()


def test_auto_on_gpu_and_tpu_choose_the_kernel_for_supported_shapes(monkeypatch):
    from nvlm_jax.models.attention import _pallas_blocker

    q, k, v = _qkv(s=32, t=32, d=16)
    for platform in ("gpu", "tpu"):
        _fake_platform(monkeypatch, platform)
        assert _pallas_blocker("auto", q, k, v, MaskSpec(causal=True)) is None
    assert "mixed dtypes" in _pallas_blocker("pallas", q, k.astype(jnp.bfloat16), v, MaskSpec())

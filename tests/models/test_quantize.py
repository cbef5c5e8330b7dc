"""Weight-only int8/int4 Linear kernels: the quantizer against qwix, the layouts, the quantized
Linear against the float Linear, sharding of the quantized params."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from flax import linen as nn

from nvlm_jax import config as C
from nvlm_jax.models import nvlm, quantize
from nvlm_jax.models.linear import Linear
from nvlm_jax.sharding import make_mesh, tree_shardings


def _w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mode,shape,in_dims", [("int8", (256, 24), 1), ("int4", (256, 24), 1),
                                                ("int8", (4, 32, 20), 2), ("int4", (4, 32, 20), 2)])
def test_quantizer_equals_qwix_on_host_and_device(mode, shape, in_dims):
    w = _w(shape)
    axes = tuple(f"a{i}" for i in range(len(shape)))
    scale_shape, _ = quantize.scale_layout(shape, axes, in_dims, mode)
    q, s = quantize.quantize_array(w, scale_shape, mode)
    qd, sd = jax.jit(lambda x: quantize.quantize_array(x, scale_shape, mode, xp=jnp))(w)
    tiled = {a: n // k for a, (n, k) in enumerate(zip(shape, scale_shape, strict=True)) if k not in (1, n)}
    channel = [a for a, (n, k) in enumerate(zip(shape, scale_shape, strict=True)) if k == n and n > 1]
    ref = qwix.quantize(jnp.asarray(w), jnp.int8 if mode == "int8" else jnp.int4, channelwise_axes=channel,
                        tiled_axes=tiled)
    assert q.dtype == quantize.qdtype(mode) and s.dtype == np.float32 and s.shape == scale_shape
    np.testing.assert_allclose(np.asarray(ref.scale), s, rtol=3e-7)
    np.testing.assert_allclose(np.asarray(sd), s, rtol=3e-7)
    # Values on a rounding tie (each tile's absmax lands on qmax + 0.5 by construction) may round
    # either way: numpy divides exactly, XLA may not. Everything else is identical.
    ratio = w.reshape(quantize._split(shape, scale_shape)) / np.expand_dims(s, tuple(range(1, 2 * len(shape), 2)))
    tie = np.abs(np.abs(ratio.reshape(shape)) % 1 - 0.5) < 1e-4
    for other in (np.asarray(ref.qvalue), np.asarray(qd)):
        diff = other.astype(np.int32) - q.astype(np.int32)
        assert np.abs(diff).max() <= 1 and not diff[~tie].any()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dequantization_error_is_at_most_half_a_scale(mode):
    w = _w((384, 16)) * np.linspace(0.01, 3, 16, dtype=np.float32)  # channels of very different range
    scale_shape, _ = quantize.scale_layout(w.shape, ("x", "y"), 1, mode)
    q, s = quantize.quantize_array(w, scale_shape, mode)
    err = np.abs(np.asarray(quantize.dequantize(jnp.asarray(q), jnp.asarray(s))) - w)
    bound = np.repeat(s, w.shape[0] // s.shape[0], axis=0) / 2
    assert (err <= bound + 4 * np.finfo(np.float32).eps * np.abs(w)).all()  # + f32 rounding of w
    qmax = 127 if mode == "int8" else 7
    assert q.astype(np.int32).max() <= qmax and q.astype(np.int32).min() >= -qmax - 1


def test_scale_layouts():
    axes = ("embed", "mlp")
    assert quantize.scale_layout((768, 3072), axes, 1, "int8") == ((1, 3072), ("quant_in", "mlp"))
    assert quantize.scale_layout((768, 3072), axes, 1, "int4") == ((6, 3072), ("quant_groups", "mlp"))
    # groups of gcd(size, 128) inputs: 96 → 3 groups of 32
    assert quantize.scale_layout((96, 8), axes, 1, "int4")[0] == (3, 8)
    o_axes = ("q_heads", "head_dim", "embed")
    assert quantize.scale_layout((12, 64, 768), o_axes, 2, "int8") == ((1, 1, 768), ("quant_in", None, "embed"))
    assert quantize.scale_layout((12, 64, 768), o_axes, 2, "int4") == ((12, 1, 768),
                                                                       ("q_heads", "quant_groups", "embed"))
    assert quantize.qdtype("int4") == np.dtype(ml_dtypes.int4)
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize.check_mode("int3")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("features,axes,in_dims,x_shape", [
    (48, ("embed", "mlp"), 1, (2, 3, 256)),
    (40, ("q_heads", "head_dim", "embed"), 2, (2, 3, 4, 32)),
])
def test_quantized_linear_is_the_float_linear_on_the_dequantized_kernel(mode, features, axes, in_dims, x_shape):
    x = jnp.asarray(_w(x_shape, 1))
    layer = Linear(features, axes, in_dims=in_dims, use_bias=True)
    with quantize.quantized_init(mode):
        qparams = nn.meta.unbox(layer.init(jax.random.key(0), x))["params"]
    assert set(qparams) == {"kernel_q", "kernel_scale", "bias"}
    assert qparams["kernel_q"].dtype == quantize.qdtype(mode)
    # stored out-major: [out, in...]
    assert qparams["kernel_q"].shape == (features,) + x_shape[len(x_shape) - in_dims:]
    kernel = quantize.dequantize(quantize.in_major(qparams["kernel_q"], in_dims), qparams["kernel_scale"])
    fparams = {"kernel": kernel, "bias": qparams["bias"] + 0.5}
    qparams = dict(qparams, bias=fparams["bias"])
    want = np.asarray(layer.apply({"params": fparams}, x))
    # f32: the same products (int8 scales the product per output instead of the weight)
    np.testing.assert_allclose(np.asarray(layer.apply({"params": qparams}, x)), want, rtol=1e-5, atol=1e-5)
    # bfloat16 compute: int4 rounds its dequantized weight to bf16 like a bf16 kernel would; int8
    # multiplies by the exact integers, so it is at least as close to the f32 result as that
    bf = Linear(features, axes, in_dims=in_dims, use_bias=True, dtype=jnp.bfloat16)
    got = np.asarray(bf.apply({"params": qparams}, x), np.float32)
    bf_kernel = np.asarray(bf.apply({"params": fparams}, x), np.float32)
    if mode == "int4":
        np.testing.assert_allclose(got, bf_kernel, rtol=1e-2, atol=1e-2)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= max(1.01 * np.abs(bf_kernel - want).max(), 1e-2 * scale)


def test_params_with_kernel_and_kernel_q_are_an_error():
    x = jnp.ones((2, 8))
    layer = Linear(4, ("embed", "mlp"))
    with quantize.quantized_init("int8"):
        p = nn.meta.unbox(layer.init(jax.random.key(0), x))["params"]
    with pytest.raises(ValueError, match="both 'kernel' and 'kernel_q'"):
        layer.apply({"params": dict(p, kernel=jnp.ones((8, 4)))}, x)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_params_shard_like_their_kernels(mode):
    cfg = C.tiny("D")
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    plain = tree_shardings(nvlm.abstract_params(cfg), mesh)
    quant = tree_shardings(nvlm.abstract_params(cfg.replace(quantize=mode)), mesh)
    def padded(spec, n):
        return tuple(spec) + (None,) * (n - len(spec))

    # kernel_q is out-major: the kernel's axes (and their mesh axes) with out moved before in
    mlp = quant["llm"]["layers"]["mlp"]["up_proj"]
    up_spec = padded(plain["llm"]["layers"]["mlp"]["up_proj"]["kernel"].spec, 3)  # [layers, embed, mlp]
    assert padded(mlp["kernel_q"].spec, 3) == (up_spec[0], up_spec[2], up_spec[1])
    assert up_spec[2] == "tensor"
    assert mlp["kernel_scale"].spec == jax.sharding.PartitionSpec(None, None, "tensor")  # [layers, 1|groups, mlp]
    o = quant["llm"]["layers"]["o_proj"]
    o_spec = padded(plain["llm"]["layers"]["o_proj"]["kernel"].spec, 4)  # [layers, heads, head_dim, embed]
    assert padded(o["kernel_q"].spec, 4) == (o_spec[0], o_spec[3], o_spec[1], o_spec[2])
    abstract = nn.meta.unbox(nvlm.abstract_params(cfg.replace(quantize=mode)))
    up = abstract["llm"]["layers"]["mlp"]["up_proj"]
    assert up["kernel_q"].dtype == quantize.qdtype(mode) and "kernel" not in up
    assert abstract["vision"]["patch_embedding"].dtype == jnp.float32  # not a Linear: stays float
    kernel_shape = quantize.in_major(np.empty(up["kernel_q"].shape, np.int8), 1, lead=1).shape
    q, s = quantize.quantize_array(np.ones(kernel_shape, np.float32), up["kernel_scale"].shape, mode)
    placed = jax.device_put({"kernel_q": quantize.out_major(q, 1, lead=1), "kernel_scale": s}, mlp)
    assert placed["kernel_q"].dtype == quantize.qdtype(mode)
    assert placed["kernel_q"].sharding.spec == mlp["kernel_q"].spec


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, quantize.SMALL_ROWS + 8])  # the one-row, few-row and long paths
def test_quantized_product_equals_the_product_with_the_dequantized_kernel(mode, rows):
    w = _w((4, 64, 24), 3)  # o_proj-like: in [4, 64], out [24]
    scale_shape, _ = quantize.scale_layout(w.shape, ("heads", "head_dim", "embed"), 2, mode)
    q, s = quantize.quantize_array(w, scale_shape, mode)
    kernel = np.asarray(quantize.dequantize(jnp.asarray(q), jnp.asarray(s)))
    x = _w((rows, 4, 64), 4)
    q_t = jnp.asarray(quantize.out_major(q, 2))
    assert q_t.shape == (24, 4, 64)
    want = np.einsum("mhd,hde->me", x.astype(np.float64), kernel.astype(np.float64))
    got = jax.jit(lambda x: quantize.quantized_product(x, q_t, jnp.asarray(s), 2, jnp.float32))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    bf = jax.jit(lambda x: quantize.quantized_product(x, q_t, jnp.asarray(s), 2, jnp.bfloat16))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(bf), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def _entry(hlo: str) -> str:
    """The ENTRY computation of a compiled module's text."""
    return hlo[hlo.index("\nENTRY"):]


def _computations(hlo: str) -> dict[str, str]:
    """name -> body of every computation in a compiled module's text."""
    out = {}
    for block in hlo.split("\n\n"):
        head = block.strip().splitlines()[0] if block.strip() else ""
        if head.endswith("{") and " -> " in head:
            out[head.split(" ")[0].lstrip("%")] = block
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_computed_first_and_unshared_are_exact_identities(dtype):
    x = jnp.asarray([[1.5, -0.0, 0.0, np.inf, -np.inf, np.nan, 3e-3, -7e4, 1e-30]], dtype)
    bits = lambda a: np.asarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)  # noqa: E731
    np.testing.assert_array_equal(bits(jax.jit(quantize.computed_first)(x)), bits(x))
    np.testing.assert_array_equal(bits(jax.jit(quantize.unshared)(x, jnp.full((3,), 0.25))), bits(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_one_row_int8_product_reads_its_input_computed_once_in_f32(dtype):
    """XLA:CPU fuses a one-row product's elementwise producers into its loop over the weight's
    rows, recomputing them for every output; the product must read `x` as computed, and convert
    the int8 weight straight to f32 (through bf16 it was 15x slower; BUILD_NOTES, quantized
    decode)."""
    w = _w((192, 256), 5)
    q, s = quantize.quantize_array(w, (1, 256), "int8")
    q_t, s = jnp.asarray(quantize.out_major(q, 1)), jnp.asarray(s)

    def swiglu_then_product(gate, up, q_t, s):  # the MLP's down_proj input
        return quantize.quantized_product(jax.nn.silu(gate) * up * 0.5, q_t, s, 1, dtype)

    args = (jnp.asarray(_w((1, 192), 6)), jnp.asarray(_w((1, 192), 7)), q_t, s)
    hlo = jax.jit(swiglu_then_product).lower(*args).compile().as_text()
    dot_bodies = [b for b in _computations(hlo).values() if " dot(" in b and "s8[" in b]
    assert dot_bodies, hlo
    for body in dot_bodies:
        for op in ("multiply(", "logistic(", "exponential(", "divide(", "select("):
            assert op not in body, f"the int8 product's loop recomputes its input ({op}):\n{body}"
        assert "bf16[" not in body, body
    got = jax.jit(swiglu_then_product)(*args)
    kernel = np.asarray(quantize.dequantize(jnp.asarray(q), s), np.float64)
    x = np.asarray((jax.nn.silu(args[0]) * args[1] * 0.5).astype(dtype), np.float64)  # [1, 192]
    np.testing.assert_allclose(np.asarray(got), x @ kernel, rtol=1e-5, atol=1e-5 * np.abs(x @ kernel).max())


def test_few_row_products_of_one_input_do_not_materialise_a_shared_broadcast():
    """k and v (gate and up) read the same input: XLA merges their identical broadcasts of it and
    XLA:CPU then writes that [rows, out, in] array whole (BUILD_NOTES, quantized decode)."""
    rows, n, k = 8, 64, 192
    pairs = []
    for seed in (8, 9):
        q, s = quantize.quantize_array(_w((k, n), seed), (1, n), "int8")
        pairs.append((jnp.asarray(quantize.out_major(q, 1)), jnp.asarray(s)))

    def k_and_v(x, pairs):
        return tuple(quantize.quantized_product(x, q, s, 1, jnp.float32) for q, s in pairs)

    x = jnp.asarray(_w((rows, k), 10))
    hlo = jax.jit(k_and_v).lower(x, pairs).compile().as_text()
    assert f"[{rows},{n},{k}]" not in _entry(hlo), _entry(hlo)
    for (q, s), got in zip(pairs, jax.jit(k_and_v)(x, pairs), strict=True):
        want = np.asarray(x, np.float64) @ np.asarray(quantize.dequantize(quantize.in_major(q, 1), s), np.float64)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

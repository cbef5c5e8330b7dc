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
    kernel = quantize.dequantize(qparams["kernel_q"], qparams["kernel_scale"])
    fparams = {"kernel": kernel, "bias": qparams["bias"] + 0.5}
    qparams = dict(qparams, bias=fparams["bias"])
    np.testing.assert_array_equal(np.asarray(layer.apply({"params": qparams}, x)),
                                  np.asarray(layer.apply({"params": fparams}, x)))
    # bfloat16 compute: the dequantized kernel rounds to bf16 like a bf16 kernel would
    bf = Linear(features, axes, in_dims=in_dims, use_bias=True, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(bf.apply({"params": qparams}, x), np.float32),
                                  np.asarray(bf.apply({"params": fparams}, x), np.float32))


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
    mlp = quant["llm"]["layers"]["mlp"]["up_proj"]
    assert mlp["kernel_q"].spec == plain["llm"]["layers"]["mlp"]["up_proj"]["kernel"].spec
    assert mlp["kernel_scale"].spec == jax.sharding.PartitionSpec(None, None, "tensor")  # [layers, 1|groups, mlp]
    o = quant["llm"]["layers"]["o_proj"]
    assert o["kernel_q"].spec == plain["llm"]["layers"]["o_proj"]["kernel"].spec
    abstract = nn.meta.unbox(nvlm.abstract_params(cfg.replace(quantize=mode)))
    up = abstract["llm"]["layers"]["mlp"]["up_proj"]
    assert up["kernel_q"].dtype == quantize.qdtype(mode) and "kernel" not in up
    assert abstract["vision"]["patch_embedding"].dtype == jnp.float32  # not a Linear: stays float
    q, s = quantize.quantize_array(np.ones(up["kernel_q"].shape, np.float32), up["kernel_scale"].shape, mode)
    placed = jax.device_put({"kernel_q": q, "kernel_scale": s}, mlp)
    assert placed["kernel_q"].dtype == quantize.qdtype(mode)
    assert placed["kernel_q"].sharding.spec == mlp["kernel_q"].spec

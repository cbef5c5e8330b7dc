"""GPTQ: the per-column algorithm against qwix's reference, its output error against
round-to-nearest, and whole models calibrated on their own inputs (any layer layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qwix._src.core import qarray
from qwix.contrib import gptq_core

import nvlm_jax
from nvlm_jax.checkpoint import gptq
from nvlm_jax.models import quantize
from nvlm_jax.sharding import make_mesh
from tests import hf_checkpoint as hc

PIXELS = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)


def _problem(rows=24, cols=64, tokens=512, seed=0):
    """A weight and correlated inputs (GPTQ helps where inputs are correlated, as in a model)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols)
    x = (rng.standard_normal((tokens, cols)) @ mix * rng.uniform(0.2, 3.0, cols)).astype(np.float32)
    return w, x


def _leaves(params):
    return {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("mode,group", [("int4", 32), ("int4", 64), ("int8", 64)])
def test_gptq_equals_qwix_reference(mode, group):
    w, x = _problem()
    gram = x.T.astype(np.float64) @ x
    q, scale = gptq.gptq_quantize(w, gram, group, mode, block=32)
    how = qarray.HowToQuantize(qtype=jnp.int4 if mode == "int4" else jnp.int8, channelwise_axes=[0],
                               tiled_axes={1: group})
    ref = gptq_core.quantize_weight(jnp.asarray(w), jnp.asarray(gram, jnp.float32), how, blocksize=32)[0]
    np.testing.assert_allclose(scale, np.asarray(ref.scale), rtol=2e-5)
    # float64 here, float32 in qwix: rounding ties may fall either way, nothing else differs
    same = q.astype(np.int32) == np.asarray(ref.qvalue).astype(np.int32)
    assert same.mean() > 0.99, same.mean()
    assert np.abs(q.astype(np.int32) - np.asarray(ref.qvalue).astype(np.int32)).max() <= 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gptq_output_error_is_below_round_to_nearest(mode):
    w, x = _problem(seed=3)
    group = 32 if mode == "int4" else 64
    q, scale = gptq.gptq_quantize(w, x.T.astype(np.float64) @ x, group, mode)
    rq, rscale = quantize.quantize_array(w, (w.shape[0], w.shape[1] // group), mode)

    def out_err(q, scale):
        deq = q.astype(np.float32).reshape(w.shape[0], -1, group) * scale[:, :, None]
        return np.linalg.norm(x @ (w - deq.reshape(w.shape)).T)

    assert out_err(q, scale) < 0.8 * out_err(rq, rscale), (out_err(q, scale), out_err(rq, rscale))
    # the scales keep round-to-nearest's convention: every stored integer is in range
    assert q.dtype == quantize.qdtype(mode) and np.abs(q.astype(np.int32)).max() <= (128 if mode == "int8" else 8)


def test_dead_inputs_get_zero_weight_and_bad_shapes_are_named():
    w, x = _problem(cols=32)
    x[:, 5] = 0.0
    q, _ = gptq.gptq_quantize(w, x.T.astype(np.float64) @ x, 32, "int4")
    assert not q[:, 5].any()
    with pytest.raises(ValueError, match="lm_head.*do not fit"):
        gptq.gptq_quantize(w, np.eye(16), 32, "int4", name="lm_head")


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


def _inputs(cfg, n=4):
    return [(hc.prompt_ids(cfg, [1], seed=i)[None], PIXELS * (1 + 0.1 * i)) for i in range(n)]


@pytest.mark.parametrize("mode,dtype,mesh", [("int4", "float32", None), ("int4", "bfloat16", (1, 4, 2))])
def test_a_calibrated_model_is_closer_to_the_float_model_than_round_to_nearest(release, mode, dtype, mesh):
    mesh = None if mesh is None else make_mesh(*mesh)
    model = nvlm_jax.load_pretrained(release.folder, dtype=dtype, mesh=mesh)
    inputs = _inputs(model.config)
    calibrated = nvlm_jax.quantize_gptq(model, inputs, mode)
    rounded = nvlm_jax.load_pretrained(release.folder, dtype=dtype, quantize=mode, mesh=mesh)
    assert calibrated.config == rounded.config
    got, want = _leaves(calibrated.params), _leaves(rounded.params)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert (got[k].shape, got[k].dtype, got[k].sharding) == (v.shape, v.dtype, v.sharding), k
    assert "kernel" in model.params["llm"]["lm_head"]  # the float model is left as it was

    def err(m):
        return np.mean([np.abs(np.asarray(m.forward(*a)) - np.asarray(model.forward(*a))).mean() for a in inputs])

    assert err(calibrated) < 0.9 * err(rounded), (err(calibrated), err(rounded))


def test_stacked_and_per_layer_layouts_calibrate_alike_and_unreached_kernels_round_to_nearest(release):
    ids = hc.prompt_ids(release.cfg, [])[None]  # text only: the ViT and projector never run
    models = {layout: nvlm_jax.quantize_gptq(nvlm_jax.load_pretrained(release.folder, dtype="float32",
                                                                      layer_layout=layout), [(ids, None)], "int4")
              for layout in ("stacked", "per_layer")}
    stacked, per_layer = (_leaves(models[k].params) for k in ("stacked", "per_layer"))
    for name in ("q_proj", "o_proj", "mlp/down_proj"):
        for which in ("kernel_q", "kernel_scale"):
            a = np.asarray(stacked[f"llm/layers/{name}/{which}"][1])
            b = np.asarray(per_layer[f"llm/layer_1/{name}/{which}"])
            np.testing.assert_array_equal(a, b, err_msg=name)
    rounded = _leaves(nvlm_jax.load_pretrained(release.folder, dtype="float32", quantize="int4",
                                               layer_layout="stacked").params)
    for k in ("vision/layers/attn/qkv/kernel_q", "projector/fc1/kernel_q", "projector/fc1/kernel_scale"):
        np.testing.assert_array_equal(np.asarray(stacked[k]), np.asarray(rounded[k]), err_msg=k)
    assert not np.array_equal(np.asarray(stacked["llm/lm_head/kernel_q"]),
                              np.asarray(rounded["llm/lm_head/kernel_q"]))


def test_calibration_needs_a_float_model_and_inputs(release):
    quantized = nvlm_jax.load_pretrained(release.folder, dtype="float32", quantize="int8")
    with pytest.raises(ValueError, match="unquantized model"):
        nvlm_jax.quantize_gptq(quantized, _inputs(quantized.config, 1), "int4")
    model = nvlm_jax.load_pretrained(release.folder, dtype="float32")
    with pytest.raises(ValueError, match="at least one input"):
        nvlm_jax.quantize_gptq(model, [], "int4")
    with pytest.raises(ValueError, match="must be one of"):
        nvlm_jax.quantize_gptq(model, _inputs(model.config, 1), "int2")


def test_inputs_of_one_length_are_batched_and_give_the_same_grams(release):
    model = nvlm_jax.load_pretrained(release.folder, dtype="float32")
    inputs = _inputs(model.config, 3) + [(hc.prompt_ids(model.config, [], text=40)[None],),
                                         model.prepare_chat(None, "hello there")]
    rows = gptq.batched_rows(inputs)
    assert sorted(ids.shape[0] for ids, _ in rows) == [1, 1, 3]
    three = next(r for r in rows if r[0].shape[0] == 3)
    np.testing.assert_array_equal(three[1], np.concatenate([p for _, p in inputs[:3]]))  # tiles in row order
    together = gptq.linear_grams(model, inputs)
    apart = [gptq.linear_grams(model, [x]) for x in inputs]
    assert set(together) == set().union(*apart)
    for key, gram in together.items():
        np.testing.assert_allclose(gram, sum(g.get(key, 0) for g in apart), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="tuples; got one of 3 items"):
        gptq.batched_rows([(1, 2, 3)])

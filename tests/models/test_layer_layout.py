"""Decoder params stacked vs per layer: the same function, lossless conversion, named errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from nvlm_jax import config as C
from nvlm_jax.checkpoint.quantized import quantize_params
from nvlm_jax.models import layer_layout, nvlm
from nvlm_jax.models.llm import init_cache
from nvlm_jax.sharding import make_mesh, tree_shardings


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: x.copy(), tree)


def _logits_and_decode(cfg, params, ids):
    """Full-sequence logits, then prefill 6 tokens + 3 one-token steps through a cache."""
    model = nvlm.NVLM(cfg)
    full, _ = jax.jit(lambda p, ids: model.apply({"params": p}, ids))(params, ids)
    cached = jax.jit(lambda p, ids, cache, t: model.apply({"params": p}, ids, cache=cache, cache_index=t))
    cache = init_cache(cfg.llm, ids.shape[0], 12, jnp.float32)
    out, cache = cached(params, ids[:, :6], cache, 0)
    steps = [out]
    for t in range(6, 9):
        out, cache = cached(params, ids[:, t:t + 1], cache, t)
        steps.append(out)
    return np.asarray(full), np.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_per_layer_params_compute_what_stacked_ones_do(quantize):
    cfg = C.tiny("D")
    params = nvlm.init_params(cfg, jax.random.key(0))
    if quantize:
        cfg, params = quantize_params(params, cfg, quantize)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 100, (2, 9)), jnp.int32)
    full, steps, cache = _logits_and_decode(cfg, params, ids)

    pcfg, per_layer = layer_layout.to_layout(_copy(params), cfg, "per_layer")
    assert pcfg.layer_layout == "per_layer" and "layers" not in per_layer["llm"]
    assert sorted(k for k in per_layer["llm"] if k.startswith("layer_")) == [
        f"layer_{i}" for i in range(cfg.llm.num_layers)]
    # exactly the params the per-layer model declares
    want = nn.meta.unbox(nvlm.abstract_params(pcfg))
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(per_layer)
    for w, p in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(per_layer), strict=True):
        assert (w.shape, w.dtype) == (p.shape, p.dtype)

    p_full, p_steps, p_cache = _logits_and_decode(pcfg, per_layer, ids)
    np.testing.assert_allclose(p_full, full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(p_steps, steps, atol=1e-5, rtol=0)
    np.testing.assert_allclose(p_steps, full[:, :9], atol=1e-5, rtol=0)  # the cache path agrees too
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(p_cache[name]), np.asarray(cache[name]), atol=1e-5, rtol=0)


def test_conversion_round_trips_bit_for_bit_and_frees_the_source():
    cfg = C.tiny("D")
    params = nvlm.init_params(cfg, jax.random.key(1))
    original = jax.tree_util.tree_map(np.asarray, params)
    source_leaf = params["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
    pcfg, per_layer = layer_layout.to_layout(params, cfg, "per_layer")
    assert source_leaf.is_deleted()  # no second copy of the stack is kept
    np.testing.assert_array_equal(per_layer["llm"]["layer_1"]["mlp"]["up_proj"]["kernel"],
                                  original["llm"]["layers"]["mlp"]["up_proj"]["kernel"][1])
    back_cfg, back = layer_layout.to_layout(per_layer, pcfg, "stacked")
    assert back_cfg == cfg
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(original), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    same_cfg, same = layer_layout.to_layout(back, back_cfg, "stacked")  # already there: unchanged
    assert same is back and same_cfg is back_cfg


def test_per_layer_params_are_placed_by_their_logical_axes():
    cfg = C.tiny("D")
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    params = nvlm.init_params(cfg, jax.random.key(0), mesh)
    pcfg, per_layer = layer_layout.to_layout(params, cfg, "per_layer", mesh)
    want = tree_shardings(nvlm.abstract_params(pcfg), mesh)
    up = per_layer["llm"]["layer_0"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == want["llm"]["layer_0"]["mlp"]["up_proj"]["kernel"].spec
    assert "tensor" in tuple(up.sharding.spec)  # split like the stacked kernel, without its layer axis


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="layer_layout='per_layer' is for NVLM-D; NVLM-X"):
        C.tiny("X").replace(layer_layout="per_layer")
    with pytest.raises(ValueError, match="layer_layout must be 'stacked' or 'per_layer'"):
        C.tiny("D").replace(layer_layout="flat")
    cfg = C.tiny("D")
    params = nvlm.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="not in the per-layer layout"):
        layer_layout.to_layout(params, cfg.replace(layer_layout="per_layer"), "stacked")
    wrong = cfg.replace(llm=dataclasses.replace(cfg.llm, num_layers=cfg.llm.num_layers + 1))
    with pytest.raises(ValueError, match=r"llm/layers.*has no leading axis of the config's"):
        layer_layout.to_layout(params, wrong, "per_layer")


def test_auto_layout_is_per_layer_for_nvlm_d_on_cpu_only():
    assert jax.default_backend() == "cpu"
    assert layer_layout.auto_layout(C.tiny("D")) == "per_layer"
    assert layer_layout.auto_layout(C.tiny("H")) == "stacked"

"""LR schedule, weight-decay mask, clipping, and no optimizer state for frozen params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvlm_jax.config import tiny
from nvlm_jax.train import freeze, optim
from nvlm_jax.train.step import param_shapes


def test_schedule_warms_up_to_max_then_cosine_decays_to_min():
    cfg = optim.OptimConfig(lr_max=1e-4, lr_min=1e-5, warmup_steps=10, total_steps=110)
    s = optim.lr_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), (1e-4 + 1e-5) / 2, rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(s(110)), 1e-5, rtol=1e-6)
    np.testing.assert_allclose(float(s(1000)), 1e-5, rtol=1e-6)
    after = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_bad_hyper_parameters_are_rejected_by_name():
    with pytest.raises(ValueError, match="lr_min"):
        optim.OptimConfig(lr_max=1e-5, lr_min=1e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.OptimConfig(warmup_steps=100, total_steps=100)


def test_decay_mask_covers_matrices_only():
    shapes = param_shapes(tiny("H"))
    mask = optim.decay_mask(shapes)
    flat = {"/".join(str(k.key) for k in p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["llm/layers/q_proj/kernel"] and flat["llm/embed_tokens"] and flat["vision/patch_embedding"]
    assert flat["xattn/k_proj/kernel"] and flat["projector/fc1/kernel"]
    for name in ("llm/layers/q_proj/bias", "llm/norm/scale", "llm/layers/input_layernorm/scale",
                 "projector/norm/bias", "vision/layers/ls1", "vision/position_embedding",
                 "vision/class_embedding", "xattn/attn_gate", "xattn/ffn_gate", "vision/layers/attn/q_norm"):
        assert not flat[name], name


def test_frozen_params_get_no_optimizer_state():
    shapes = param_shapes(tiny("D"))
    mask = freeze.trainable_mask(shapes, "D", "pretrain")
    trainable, _ = freeze.partition(shapes, mask)
    opt = optim.make_optimizer(optim.OptimConfig(warmup_steps=1, total_steps=10))
    state = jax.eval_shape(opt.init, trainable)
    paths = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
             for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert paths and not any("llm" in p or "vision" in p for p in paths)
    moments = [p for p in paths if "/mu/" in p or "/nu/" in p]
    assert len(moments) == 2 * len(jax.tree_util.tree_leaves(trainable))


def test_weight_decay_shrinks_kernels_but_not_norms_and_clipping_bounds_the_moment():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
    cfg = optim.OptimConfig(lr_max=0.1, lr_min=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=1.0)
    opt = optim.make_optimizer(cfg)
    state = opt.init(params)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, state, params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["dense"]["bias"], 0)
    np.testing.assert_array_equal(updates["norm"]["scale"], 0)
    big = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
    _, state = opt.update(big, state, params)
    mu = state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
    norm = float(optim.optax.tree.norm(mu))
    np.testing.assert_allclose(norm, (1 - cfg.b1) * cfg.clip_norm, rtol=1e-5)

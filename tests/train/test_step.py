"""The training step: per-token loss normalisation (packing-invariant), frozen params untouched,
non-finite steps skipped, gradient accumulation equal to the full batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from nvlm_jax.config import tiny
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh
from nvlm_jax.train import freeze, optim
from nvlm_jax.train import step as S
from tests.train import fakes

CFG = tiny("D")
OPT_CFG = optim.OptimConfig(lr_max=1e-2, lr_min=1e-3, warmup_steps=0, total_steps=10)


def test_token_stats_average_over_answer_tokens_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], bool)
    stats = S.token_stats(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(stats.loss_sum), nll[mask].sum(), rtol=1e-5)
    assert float(stats.count) == 4
    assert float(stats.correct) == (logits.argmax(-1) == targets)[mask].sum()


def test_packed_and_unpacked_samples_give_the_same_loss_and_gradients():
    rng = np.random.default_rng(1)
    short = fakes.sample(CFG, rng, prompt_len=3, answer_len=2)
    long = fakes.sample(CFG, rng, prompt_len=9, answer_len=7)
    # Same shapes both ways (one compile): two rows of one sample vs one row of two and an empty row.
    unpacked = fakes.pack(CFG, [[short], [long]], seq_len=40, tile_slots=2)
    packed = fakes.pack(CFG, [[short, long], []], seq_len=40, tile_slots=2)
    assert packed["segment_ids"][0].max() == 2 and not packed["segment_ids"][1].any()
    params = fakes.random_params(CFG)
    trainable, frozen = freeze.partition(params, freeze.trainable_mask(params, "D", "sft"))  # LLM + projector
    loss_and_grad = jax.jit(jax.value_and_grad(lambda t, f, b: S.batch_loss(freeze.combine(t, f), CFG, b)))
    loss_u, grads_u = loss_and_grad(trainable, frozen, unpacked)
    loss_p, grads_p = loss_and_grad(trainable, frozen, packed)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads_p, grads_u)


@pytest.fixture(scope="module")
def setup():
    """A one-device mesh, pretrain-stage (projector only) state and its jitted step."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = optim.make_optimizer(OPT_CFG)
    params = fakes.random_params(CFG, 0, mesh)
    mask = freeze.trainable_mask(params, "D", "pretrain")
    shardings, _ = S.train_state_shardings(CFG, opt, mask, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = jax.jit(lambda p: S.init_train_state(p, opt, mask), out_shardings=shardings)(params)
    steps = {
        k: S.jit_train_step(S.make_train_step(CFG, opt, mask, optim.lr_schedule(OPT_CFG), grad_accum_steps=k),
                            shardings, S.batch_sharding(mesh, 4))
        for k in (1, 2)
    }
    return mesh, state, steps


def _run(setup, state, batch, k=1):
    mesh, _, steps = setup
    state = jax.tree_util.tree_map(jnp.copy, state)  # the step donates its input
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return steps[k](state, batch)


def test_step_updates_trainable_params_only(setup):
    _, state, _ = setup
    new, metrics = _run(setup, state, fakes.random_batch(CFG, 0, batch_size=4))
    assert float(metrics["finite"]) == 1 and int(new.step) == 1 and int(new.applied) == 1
    assert float(metrics["lr"]) == pytest.approx(1e-2)
    for key in ("vision", "llm"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, new.params[key], state.params[key])
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), new.params["projector"],
                                     state.params["projector"])
    assert all(jax.tree_util.tree_leaves(changed))


def test_non_finite_step_is_skipped_and_counted(setup):
    _, state, _ = setup
    bad = fakes.random_batch(CFG, 1, batch_size=4)
    bad["pixel_values"][0, 0, 0, 0, 0] = np.nan
    skipped, metrics = _run(setup, state, bad)
    assert float(metrics["finite"]) == 0 and int(metrics["nonfinite_run"]) == 1
    assert int(skipped.step) == 1 and int(skipped.applied) == 0 and int(skipped.nonfinite_total) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, skipped.params, state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, skipped.opt_state, state.opt_state)
    again, metrics = _run(setup, skipped, bad)
    assert int(metrics["nonfinite_run"]) == 2
    good, metrics = _run(setup, again, fakes.random_batch(CFG, 2, batch_size=4))
    assert int(metrics["nonfinite_run"]) == 0 and int(good.nonfinite_total) == 2 and int(good.applied) == 1


def test_gradient_accumulation_matches_the_full_batch(setup):
    _, state, _ = setup
    batch = fakes.random_batch(CFG, 3, batch_size=4)
    full, m_full = _run(setup, state, batch, k=1)
    accum, m_accum = _run(setup, state, batch, k=2)
    np.testing.assert_allclose(float(m_accum["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_accum["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    # Adam's first update is ~lr·sign(g): allow 0.1% of the LR where g is ~0 and summation order differs.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                           accum.params, full.params)


def test_batch_size_must_divide_over_the_data_axes():
    mesh = make_mesh(1, -1, 1)
    with pytest.raises(ValueError, match="batch size 6 is not divisible"):
        S.batch_sharding(mesh, 6)


def test_pure_bf16_training_keeps_bf16_params_and_moments():
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    ocfg = optim.OptimConfig(lr_max=1e-2, lr_min=1e-3, warmup_steps=0, total_steps=10, mu_dtype="bfloat16")
    opt = optim.make_optimizer(ocfg)
    params = fakes.random_params(cfg)
    mask = freeze.trainable_mask(params, "D", "pretrain")
    state = S.init_train_state(params, opt, mask)
    step = jax.jit(S.make_train_step(cfg, opt, mask, optim.lr_schedule(ocfg)))
    new, metrics = step(state, fakes.random_batch(cfg, 0, batch_size=2))
    assert float(metrics["finite"]) == 1 and np.isfinite(float(metrics["loss"]))
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(new.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    moments = [x for x in jax.tree_util.tree_leaves(new.opt_state) if x.ndim]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree_util.tree_leaves(new.params["projector"]),
                                                    jax.tree_util.tree_leaves(params["projector"]), strict=True))

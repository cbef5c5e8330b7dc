"""LoRA adapters: identity at init, trainable set and optimizer state, merge, dropout, sharding,
saving on their own, for NVLM-D, X and H."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from nvlm_jax import config as C
from nvlm_jax.models import lora, nvlm
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh
from nvlm_jax.train import freeze, optim
from nvlm_jax.train import step as S
from tests.train import fakes

LORA = C.LoraConfig(rank=4, alpha=8.0, targets=("llm", "vision", "projector"))
logits_of = jax.jit(nvlm.apply_batch, static_argnums=1)  # op-by-op apply is slow on CPU


def _adapted(arch: str, lora_cfg: C.LoraConfig = LORA, seed: int = 0):
    base_cfg = C.tiny(arch)
    cfg = base_cfg.replace(lora=lora_cfg)
    base = fakes.random_params(base_cfg, seed)
    return base_cfg, cfg, base, lora.with_adapters(base, lora.init_adapters(cfg, jax.random.key(seed + 1)))


def _randomise_b(params, seed=3):
    """Non-zero B everywhere (a trained adapter), so the adapters change the output."""
    keys = iter(jax.random.split(jax.random.key(seed), 1000))

    def go(tree):
        if not isinstance(tree, dict):
            return tree
        return {k: (0.05 * jax.random.normal(next(keys), v.shape, v.dtype) if k == "lora_b" else go(v))
                for k, v in tree.items()}

    return go(params)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_adapted_model_equals_base_at_init_and_merge_equals_unmerged(arch):
    base_cfg, cfg, base, params = _adapted(arch)
    batch = fakes.random_batch(base_cfg, 0)
    base_logits = logits_of(base, base_cfg, batch)
    np.testing.assert_array_equal(np.asarray(logits_of(params, cfg, batch)), np.asarray(base_logits))

    trained = _randomise_b(params)
    adapted = np.asarray(logits_of(trained, cfg, batch))
    assert np.abs(adapted - np.asarray(base_logits)).max() > 1e-3  # the adapters do act
    merged, merged_cfg = lora.merge(trained, cfg)
    assert merged_cfg.lora.rank == 0 and not lora.has_adapters(merged)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    np.testing.assert_allclose(np.asarray(logits_of(merged, merged_cfg, batch)), adapted, atol=1e-5, rtol=0)


def test_targets_choose_where_adapters_go():
    def paths(targets):
        cfg = C.tiny("D").replace(lora=C.LoraConfig(rank=2, targets=targets))
        flat = jax.tree_util.tree_flatten_with_path(lora.adapters(nvlm.abstract_params(cfg)),
                                                    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
        return {jax.tree_util.keystr(p[:-1]) for p, _ in flat}

    llm = {f"['llm']['layers']['{n}']" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = {f"['llm']['layers']['mlp']['{n}']" for n in ("gate_proj", "up_proj", "down_proj")}
    assert paths(("llm_attention",)) == llm
    assert paths(("llm",)) == llm | mlp
    assert paths(("projector",)) == {"['projector']['fc1']", "['projector']['fc2']"}
    assert {p for p in paths(("vision",))} == {f"['vision']['layers']{m}" for m in
                                               ("['attn']['qkv']", "['attn']['proj']", "['fc1']", "['fc2']")}


def test_lora_config_errors_name_the_field():
    with pytest.raises(ValueError, match="lora.targets"):
        C.LoraConfig(rank=2, targets=("llm", "decoder"))
    with pytest.raises(ValueError, match="lora.dropout"):
        C.LoraConfig(rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="lora.rank"):
        C.LoraConfig(rank=-1)
    assert C.LoraConfig(rank=2, targets="llm, vision").targets == ("llm", "vision")
    cfg = C.tiny("D").replace(lora=C.LoraConfig(rank=2, targets=("llm", "projector")))
    assert C.NVLMConfig.from_dict(cfg.to_dict()) == cfg  # saved with checkpoints as JSON


@pytest.mark.parametrize("arch,stage,full", [("D", "sft", {"projector"}), ("X", "sft", {"xattn"}),
                                              ("H", "pretrain", {"projector", "xattn"})])
def test_only_adapters_and_stage_parts_train_and_have_optimizer_state(arch, stage, full):
    base_cfg, _, base, _ = _adapted(arch)
    cfg = base_cfg.replace(lora=C.LoraConfig(rank=4, targets=("llm",)))
    params = lora.with_adapters(base, lora.init_adapters(cfg, jax.random.key(1)))
    mask = freeze.trainable_mask(params, arch, stage)
    trainable, frozen = freeze.partition(params, mask)
    n_adapters = freeze.count_params(lora.adapters(params))
    n_full = sum(freeze.count_params(params[k]) for k in full)
    assert freeze.count_params(trainable) == n_adapters + n_full
    assert not lora.has_adapters(frozen) and freeze.count_params(frozen["llm"]) == freeze.count_params(base["llm"])
    opt = optim.make_optimizer(optim.OptimConfig(warmup_steps=0, total_steps=10))
    state = S.init_train_state(params, opt, mask)
    # Adam's two moments per trainable element, nothing for the frozen base.
    assert freeze.count_params(state.opt_state) == 2 * (n_adapters + n_full) + 2  # + counts
    batch = fakes.random_batch(base_cfg, 0)
    grads = jax.jit(jax.grad(lambda t: S.batch_loss(freeze.combine(t, frozen), cfg, batch)))(trainable)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    assert float(jnp.abs(grads["llm"]["layers"]["q_proj"]["lora_b"]).sum()) > 0  # B gets gradients at B = 0


def test_train_step_leaves_the_base_bit_identical_and_moves_adapters():
    base_cfg = C.tiny("D")
    cfg = base_cfg.replace(lora=C.LoraConfig(rank=4, dropout=0.1, targets=("llm",)))
    mesh = make_mesh(1, -1, 1)
    opt_cfg = optim.OptimConfig(lr_max=1e-2, warmup_steps=0, total_steps=10)
    opt = optim.make_optimizer(opt_cfg)
    adapters = lora.init_adapters(cfg, jax.random.key(1), mesh)
    params = lora.with_adapters(fakes.random_params(base_cfg, 0, mesh), adapters)
    mask = freeze.trainable_mask(params, "D", "sft")
    shardings, _ = S.train_state_shardings(cfg, opt, mask, mesh)
    step = S.jit_train_step(S.make_train_step(cfg, opt, mask), shardings, S.batch_sharding(mesh, 8))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = jax.jit(lambda p: S.init_train_state(p, opt, mask), out_shardings=shardings)(params)
        before = jax.device_get(state.params)
        for i in range(2):
            state, metrics = step(state, fakes.random_batch(base_cfg, i, batch_size=8))
    after = jax.device_get(state.params)
    assert float(metrics["finite"]) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora.without_adapters(after["llm"]),
                           lora.without_adapters(before["llm"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, after["vision"], before["vision"])
    assert np.abs(after["llm"]["layers"]["q_proj"]["lora_b"]).max() > 0
    # Adapters shard like their kernels: A's input axis as the kernel's, the rank axis replicated.
    a = state.params["llm"]["layers"]["q_proj"]["lora_a"]
    kernel = state.params["llm"]["layers"]["q_proj"]["kernel"]
    assert a.sharding.spec[:2] == kernel.sharding.spec[:2] and a.sharding.spec[2] is None


def test_dropout_only_with_a_dropout_rng():
    base_cfg, _, _, params = _adapted("D", C.LoraConfig(rank=4, dropout=0.5, targets=("llm",)))
    cfg = base_cfg.replace(lora=C.LoraConfig(rank=4, dropout=0.5, targets=("llm",)))
    params = _randomise_b(params)
    batch = fakes.random_batch(base_cfg, 0)
    plain = np.asarray(logits_of(params, cfg, batch))
    np.testing.assert_array_equal(np.asarray(logits_of(params, cfg, batch)), plain)
    d1 = np.asarray(logits_of(params, cfg, batch, dropout_rng=jax.random.key(1)))
    d2 = np.asarray(logits_of(params, cfg, batch, dropout_rng=jax.random.key(2)))
    assert np.abs(d1 - plain).max() > 1e-4 and np.abs(d1 - d2).max() > 1e-4


def test_adapters_save_and_restore_on_their_own(tmp_path):
    _, cfg, _, params = _adapted("D")
    params = _randomise_b(params)
    lora.save_adapters(tmp_path / "adapters", params, cfg)
    mesh = make_mesh(1, -1, 1)
    restored = lora.restore_adapters(tmp_path / "adapters", cfg, mesh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored),
                           jax.device_get(lora.adapters(params)))
    assert restored["llm"]["layers"]["q_proj"]["lora_a"].sharding.mesh.shape == mesh.shape
    with pytest.raises(ValueError, match="already exists"):
        lora.save_adapters(tmp_path / "adapters", params, cfg)
    other = cfg.replace(lora=C.LoraConfig(rank=8, targets=("llm",)))
    with pytest.raises(ValueError, match="saved with"):
        lora.restore_adapters(tmp_path / "adapters", other)


def test_an_adapter_save_that_fails_midway_leaves_nothing_under_its_name(tmp_path, monkeypatch):
    _, cfg, _, params = _adapted("D")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora, "_lora_dict", crash)  # the config write, after the Orbax save
    with pytest.raises(OSError, match="disk full"):
        lora.save_adapters(tmp_path / "adapters", params, cfg)
    assert not (tmp_path / "adapters").exists()
    monkeypatch.undo()
    lora.save_adapters(tmp_path / "adapters", params, cfg)  # a retry under the same name succeeds
    assert lora.read_adapter_config(tmp_path / "adapters") == cfg.lora

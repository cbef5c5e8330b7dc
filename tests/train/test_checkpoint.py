"""Training checkpoints: iterator state, restore onto another mesh, interrupted saves ignored,
keep-last + keep-best retention, and the generic params restore for converted checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from nvlm_jax.config import tiny
from nvlm_jax.models import nvlm
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh, tree_shardings
from nvlm_jax.train import checkpoint as C
from nvlm_jax.train import freeze, optim
from nvlm_jax.train import step as S
from tests.train import fakes

CFG = tiny("D")
OPT = optim.make_optimizer(optim.OptimConfig(warmup_steps=1, total_steps=10))


def _state(mesh):
    params = fakes.random_params(CFG, 0, mesh)
    mask = freeze.trainable_mask(params, "D", "sft")
    shardings, shapes = S.train_state_shardings(CFG, OPT, mask, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = jax.jit(lambda p: S.init_train_state(p, OPT, mask), out_shardings=shardings)(params)
    # Non-trivial optimizer moments, so the restore is checked on real values.
    state = state.replace(opt_state=jax.tree_util.tree_map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x,
                                                           state.opt_state), step=jnp.int32(7))
    return state, mask


@pytest.mark.parametrize("value", [None, b"\x00grain-bytes\xff", {"index": np.int64(3), "nested": [1, {"a": 2.5}]}])
def test_iterator_states_round_trip(value):
    encoded = C.encode_iterator_state(value)
    decoded = C.decode_iterator_state(encoded)
    if isinstance(value, dict):
        assert decoded == {"index": 3, "nested": [1, {"a": 2.5}]}
    else:
        assert decoded == value


def test_unserialisable_iterator_state_is_named():
    with pytest.raises(ValueError, match="object"):
        C.encode_iterator_state({"x": object()})


def test_restore_onto_a_different_mesh_shape(tmp_path):
    mesh = make_mesh(1, 8, 1)
    state, mask = _state(mesh)
    ckpts = C.TrainCheckpoints(tmp_path, C.CheckpointConfig(every=1, keep=2, keep_best=0))
    ckpts.save(7, state, {"index": 7}, {"note": "test"})
    ckpts.wait()
    for other in (make_mesh(2, 2, 2), make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        _, target = S.train_state_shardings(CFG, OPT, mask, other)
        restored = ckpts.restore(target)
        assert restored.step == 7 and restored.data_state == {"index": 7} and restored.run_config == {"note": "test"}
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               restored.state, state)
        emb = restored.state.params["llm"]["embed_tokens"]
        assert emb.sharding.mesh.shape == other.shape
    ckpts.close()
    # The same params as a converter-style params checkpoint, restored generically onto another mesh.
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "params", state.params)
    shardings = tree_shardings(nvlm.abstract_params(CFG), make_mesh(2, 2, 2))
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    S.param_shapes(CFG), shardings)
    params, missing = C.restore_params(tmp_path / "params", target)
    assert not missing
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, state.params)
    assert params["llm"]["embed_tokens"].sharding == shardings["llm"]["embed_tokens"]


def _small_state(value=1.0):
    zero = jnp.zeros((), jnp.int32)
    return S.TrainState(step=zero, applied=zero, params={"w": jnp.full((4, 2), value)},
                        opt_state={"mu": {"w": jnp.zeros((4, 2))}}, nonfinite_run=zero, nonfinite_total=zero)


def test_interrupted_save_is_ignored_and_cleaned_up(tmp_path):
    state = _small_state(3.0)
    ckpts = C.TrainCheckpoints(tmp_path, C.CheckpointConfig(every=1, keep=3, keep_best=0))
    ckpts.save(4, state, None, {})
    ckpts.close()
    partial = tmp_path / "6.orbax-checkpoint-tmp"  # what a save killed mid-write leaves
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\x00" * 10)
    ckpts = C.TrainCheckpoints(tmp_path, C.CheckpointConfig(every=1, keep=3, keep_best=0))
    assert ckpts.latest_step() == 4 and ckpts.all_steps() == [4]
    ckpts.save(8, state, None, {})  # the next save first finishes removing the partial folder
    ckpts.wait()
    assert not partial.exists() and ckpts.all_steps() == [4, 8]
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        state)
    restored = ckpts.restore(target, step=4)
    assert restored.step == 4 and float(restored.state.params["w"][0, 0]) == 3.0
    ckpts.close()


def test_keeps_the_last_k_and_the_best(tmp_path):
    state = _small_state()
    ckpts = C.TrainCheckpoints(tmp_path, C.CheckpointConfig(every=1, keep=2, keep_best=1, best_metric="eval/em",
                                                            best_mode="max"))
    scores = {1: 0.1, 2: 0.9, 3: 0.3, 4: None, 5: 0.2}
    for step, score in scores.items():
        ckpts.save(step, state, None, {}, metrics=None if score is None else {"eval/em": score})
        ckpts.wait()
    assert ckpts.all_steps() == [2, 4, 5]
    assert ckpts.save(5, state, None, {}) is False  # already saved
    ckpts.close()


def test_restore_params_checks_every_leaf_and_can_leave_missing_ones(tmp_path):
    params = {"llm": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "projector": {"b": np.ones(4, np.float32)}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "params", params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "llm": {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=device)},
        "projector": {"b": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=device)},
        "xattn": {"g": jax.ShapeDtypeStruct((), jnp.float32, sharding=device)},
    }
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['xattn/g'\]"):
        C.restore_params(tmp_path / "params", target)
    restored, missing = C.restore_params(tmp_path / "params", target, allow_missing=True)
    assert missing == ["xattn/g"] and "xattn" not in restored
    assert restored["llm"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored["llm"]["w"], np.float32), params["llm"]["w"])
    bad = dict(target, llm={"w": jax.ShapeDtypeStruct((3, 2), jnp.float32, sharding=device)})
    with pytest.raises(ValueError, match=r"llm/w: checkpoint shape \(2, 3\) != expected \(3, 2\)"):
        C.restore_params(tmp_path / "params", bad, allow_missing=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.restore_params(tmp_path / "nowhere", target)


def test_data_states_are_saved_per_shard_and_restored_for_the_same_shard_count(tmp_path):
    state = _small_state()
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        state)
    ckpts = C.TrainCheckpoints(tmp_path, C.CheckpointConfig(every=1, keep=3, keep_best=0))
    # What the two processes of a 2-shard run write between them (here one process reads both).
    ckpts.save(1, state, C.DataShards(2, {0: {"index": 10}, 1: b"\x01state"}), {})
    ckpts.save(2, state, {"index": 20}, {})  # a plain iterator state: one shard per process
    ckpts.wait()
    assert sorted(p.name for p in (tmp_path / "1" / "data").glob("shard_*")) == ["shard_0-of-2.json",
                                                                                  "shard_1-of-2.json"]
    both = ckpts.restore(target, step=1, data_shards=(2, (0, 1))).data_state
    assert both == C.DataShards(2, {0: {"index": 10}, 1: b"\x01state"})
    assert ckpts.restore(target, step=1, data_shards=(2, (1,))).data_state.states == {1: b"\x01state"}
    assert ckpts.restore(target, step=2).data_state == {"index": 20}
    with pytest.raises(ValueError, match=r"saved by a run reading \[2\] data shard\(s\) but this run reads 1"):
        ckpts.restore(target, step=1)  # one process, one shard per process
    with pytest.raises(ValueError, match="data.num_shards=2"):
        ckpts.restore(target, step=1, data_shards=(4, (0,)))
    ckpts.close()

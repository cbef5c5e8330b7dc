"""LoRA training checkpoints hold the trainable params only: the fingerprint of the frozen base,
exact resume with the base re-created, loading a LoRA workdir anywhere (from another folder,
as a fine-tune's init), and refusing a base that changed."""

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax.checkpoint import folders, frozen_base, restore
from nvlm_jax.config import LoraConfig
from nvlm_jax.models import lora, nvlm
from nvlm_jax.sharding import make_mesh
from nvlm_jax.train import checkpoint, freeze, loop, optim
from tests.checkpoint.workdir import tiny_model, write_workdir
from tests.train import fakes

# One configuration for every run here, so the jitted step is compiled once per process.
LOOP = dict(stage="sft", log_every=1, num_devices=1, peak_flops_per_device=1e11, seed=3)
OPTIM = optim.OptimConfig(lr_max=1e-3, lr_min=1e-4, warmup_steps=1, total_steps=10)


@pytest.fixture(scope="module")
def tiny():
    cfg, params, tok = tiny_model()
    return cfg, cfg.replace(lora=LoraConfig(rank=4, alpha=8.0, targets=("llm",))), params


def _equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train(cfg, workdir, num_steps, **kwargs):
    return loop.train(cfg, loop.LoopConfig(num_steps=num_steps, **LOOP), OPTIM,
                      checkpoint.CheckpointConfig(every=2, keep=3, keep_best=0), workdir,
                      fakes.FakeIterator(cfg, batch_size=2), console=False, **kwargs)


def _losses(workdir):
    from nvlm_jax.train import metrics

    return {r["step"]: r["train/loss"] for r in metrics.read_jsonl(workdir / metrics.METRICS_FILE)
            if "train/loss" in r}


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_fingerprint_sees_every_bit_and_not_the_sharding():
    rng = np.random.default_rng(0)
    tree = {"a": {"kernel": rng.normal(size=(8, 16)).astype(np.float32)},
            "b": rng.normal(size=(4, 8)).astype(jnp.bfloat16), "q": rng.integers(-9, 9, 16).astype(np.int8)}
    fp = frozen_base.fingerprint(tree)
    mesh = make_mesh(1, 4, 2)
    sharded = dict(tree, a={"kernel": jax.device_put(
        tree["a"]["kernel"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")))})
    assert frozen_base.fingerprint(sharded) == fp
    flipped = tree["a"]["kernel"].copy()
    flipped.view(np.uint32)[3, 5] ^= 1  # the last mantissa bit of one value
    swapped = tree["a"]["kernel"].copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values, moved
    changed = [dict(tree, a={"kernel": flipped}), dict(tree, a={"kernel": swapped}),
               dict(tree, b=tree["b"].astype(np.float32)), {"c" if k == "a" else k: v for k, v in tree.items()}]
    assert len({fp, *(frozen_base.fingerprint(t) for t in changed)}) == 5


def test_a_lora_run_saves_its_trainable_params_only_and_resumes_exactly(tiny, tmp_path):
    _, cfg, _ = tiny
    straight = _train(cfg, tmp_path / "a", 4)  # from scratch: the base is the seeded random init
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")  # as if killed before the last save
    resumed = _train(cfg, tmp_path / "b", 4)
    assert resumed.resumed_from == 2 and _losses(tmp_path / "b") == _losses(tmp_path / "a")
    _equal(resumed.state.params, straight.state.params)

    step_dir = tmp_path / "a" / "checkpoints" / "4"
    run = folders.read_run_config(step_dir)
    assert run[frozen_base.RECORD_KEY]["init"]["checkpoint"] == "" and run[frozen_base.RECORD_KEY]["seed"] == 3
    mask = freeze.trainable_mask(straight.state.params, cfg.arch, "sft")
    trainable, frozen = freeze.partition(straight.state.params, mask)
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        saved = restore._stored_leaves(ckptr, step_dir / "state")
    saved_params = {k.removeprefix("params/"): v for k, v in saved.items() if k.startswith("params/")}
    assert set(saved_params) == set(frozen_base.leaf_paths(trainable))  # projector + LLM adapters
    assert sum(int(np.prod(v.shape)) for v in saved_params.values()) == freeze.count_params(trainable)
    base_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen))
    # params + two Adam moments of the trainable part, counters, the run config: no base.
    assert _bytes(step_dir) < 3 * freeze.count_params(trainable) * 4 + 200_000 < base_bytes

    # Loading the workdir re-creates the seeded base: the live params, bit for bit.
    got, missing = restore.load_params(folders.locate(tmp_path / "a"), cfg, loop.build_mesh(loop.LoopConfig(**LOOP)))
    assert missing == []
    _equal(got, straight.state.params)


def test_a_lora_workdir_from_another_checkpoint_loads_anywhere_and_refuses_a_changed_base(
        tiny, tmp_path, monkeypatch):
    base_cfg, cfg, params = tiny
    write_workdir(tmp_path / "src", base_cfg, params)  # the init checkpoint: another run's workdir
    monkeypatch.chdir(tmp_path)
    init = {"checkpoint": "src"}  # relative, as typed on a command line
    result = _train(cfg, tmp_path / "lora", 2, run_config={"tokenizer": "tiny", "init": init},
                    init_params=lambda mesh: restore.run_init_params(init, 0, cfg, mesh))
    record = folders.read_run_config(tmp_path / "lora" / "checkpoints" / "2")[frozen_base.RECORD_KEY]
    assert record["init"]["checkpoint"] == str(tmp_path / "src")
    live = result.state.params

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the relative init path no longer resolves from here
    mesh = loop.build_mesh(loop.LoopConfig(**LOOP))  # the run's: its compiled initialisers are reused
    # layer_layout="stacked": the params as stored (the per-layer inference layout is tested apart)
    model = nvlm_jax.load_pretrained(tmp_path / "lora", dtype=None, mesh=mesh, merge_lora=False,
                                     layer_layout="stacked")
    _equal(model.params, live)
    batch = {k: jnp.asarray(v) for k, v in fakes.random_batch(cfg, 7).items()}
    np.testing.assert_array_equal(np.asarray(nvlm.apply_batch(model.params, cfg, batch)),
                                  np.asarray(nvlm.apply_batch(live, cfg, batch)))
    merged = nvlm_jax.load_pretrained(tmp_path / "lora", dtype=None, mesh=mesh,  # merged: what chat / eval load
                                      layer_layout="stacked")
    merged_live, _ = lora.merge(live, cfg)
    _equal(merged.params, merged_live)
    monkeypatch.chdir(tmp_path)  # the workdir itself as a relative path (Orbax reads no metadata from one)
    _equal(nvlm_jax.load_pretrained("lora", dtype=None, mesh=mesh, layer_layout="stacked").params, merged_live)
    monkeypatch.chdir(tmp_path / "elsewhere")
    # A fine-tune initialised from the LoRA workdir gets the merged weights.
    _equal(restore.run_init_params({"checkpoint": str(tmp_path / "lora")}, 0, base_cfg, mesh), merged_live)

    shutil.rmtree(tmp_path / "src")  # runs/main overwritten by a newer run
    write_workdir(tmp_path / "src", base_cfg, jax.tree_util.tree_map(lambda x: x * 2, params))
    want = f"re-created from init checkpoint {tmp_path / 'src'}"
    with pytest.raises(frozen_base.BaseMismatchError, match=want):
        nvlm_jax.load_pretrained(tmp_path / "lora", mesh=mesh)
    with pytest.raises(frozen_base.BaseMismatchError, match=want):
        _train(cfg, tmp_path / "lora", 4, run_config={"tokenizer": "tiny", "init": init},
               init_params=lambda mesh: restore.run_init_params({"checkpoint": str(tmp_path / "src")}, 0, cfg, mesh))
    shutil.rmtree(tmp_path / "src")
    with pytest.raises(ValueError, match=f"frozen base comes from init checkpoint {tmp_path / 'src'}.*does not exist"):
        nvlm_jax.load_pretrained(tmp_path / "lora", mesh=mesh)
    assert os.getcwd() == str(tmp_path / "elsewhere")

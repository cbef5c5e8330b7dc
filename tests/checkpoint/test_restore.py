"""Reading any checkpoint kind: configs, prompt formats, tokenizers and params (one restore for
converted folders, training checkpoints and the training launcher's init)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax.checkpoint import restore
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.sharding import make_mesh
from tests import hf_checkpoint as hc
from tests.checkpoint.workdir import params_at, tiny_model, write_workdir


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def workdir(tiny, tmp_path_factory):
    cfg, params, _ = tiny
    root = tmp_path_factory.mktemp("run")
    fmt = PromptFormat.for_model(cfg, tag_style="2d_grid", max_tiles=2, system_message=None)
    write_workdir(root, cfg, params, [(2, 0.25), (4, 0.75), (6, 0.5)], prompt_format=fmt)
    return root, fmt


def _equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("step, want", [("latest", 6), ("best", 4), (2, 2)])
def test_load_pretrained_reads_a_training_workdir(tiny, workdir, step, want):
    cfg, params, tok = tiny
    root, fmt = workdir
    model = nvlm_jax.load_pretrained(root, dtype=None, step=step, layer_layout="stacked")  # as stored
    assert model.config == cfg and model.source.step == want and model.prompt_format == fmt
    _equal(model.params, params_at(params, want))
    assert model.tokenizer.encode("red circle").ids == tok.encode("red circle").ids


def test_a_step_folder_loads_like_its_workdir_step(tiny, workdir):
    cfg, params, _ = tiny
    root, _ = workdir
    model = nvlm_jax.load_pretrained(root / "checkpoints" / "4", dtype="bfloat16")
    assert model.config.param_dtype == "bfloat16" and model.source.kind == "step"
    assert model.params["llm"]["embed_tokens"].dtype == jnp.bfloat16
    assert nvlm_jax.pretrained.read_config(root / "checkpoints" / "4") == cfg


def test_older_training_checkpoints_get_the_runs_tag_style(tiny, tmp_path):
    cfg, params, _ = tiny
    write_workdir(tmp_path, cfg, params, data={"tag_style": "2d_bbox", "max_tiles": 0, "system_message": ""})
    info = restore.read_info(tmp_path)
    assert info.prompt_format == PromptFormat.for_model(cfg, tag_style="2d_bbox", system_message=None)
    assert info.tokenizer == "tiny" and info.run_config["model"] == cfg.to_dict()


def test_converted_and_hf_folders_carry_the_release_format():
    converted = restore.read_info(hc.tiny_converted())
    cfg = converted.config
    assert converted.prompt_format == PromptFormat.for_model(cfg)
    data = json.loads((hc.tiny_converted() / "nvlm_config.json").read_text())
    assert PromptFormat.from_dict(data["prompt_format"]) == PromptFormat.for_model(cfg)
    release = hc.tiny_release().folder
    hf = restore.read_info(release)
    hf_json = json.loads((release / "config.json").read_text())
    assert hf.prompt_format == PromptFormat.release().replace(
        max_tiles=hf_json["max_dynamic_patch"], use_thumbnail=hf_json["use_thumbnail"],
        tokens_per_tile=cfg.num_image_tokens)
    assert nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32").prompt_format == converted.prompt_format


def test_older_converted_folders_get_the_models_format(tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(hc.tiny_converted(), folder)
    data = json.loads((folder / "nvlm_config.json").read_text())
    del data["prompt_format"]
    (folder / "nvlm_config.json").write_text(json.dumps(data))
    assert restore.read_info(folder).prompt_format == PromptFormat.for_model(restore.read_config(folder))


def test_restore_onto_a_mesh_and_missing_leaves(tiny, workdir):
    cfg, params, _ = tiny
    root, _ = workdir
    mesh = make_mesh(1, 4, 2)
    got, missing = restore.load_params(nvlm_jax.checkpoint.locate(root), cfg, mesh)
    assert missing == [] and len(got["llm"]["embed_tokens"].addressable_shards) == 8
    _equal(got, params_at(params, 6))


def test_the_training_launcher_initialises_from_a_training_workdir(tiny, workdir):
    from ml_collections import ConfigDict

    from nvlm_jax.train import launch

    cfg, params, _ = tiny
    root, _ = workdir
    c = ConfigDict({"tokenizer": "", "seed": 0, "arch": "D",
                    "init": {"checkpoint": str(root), "config_json": "", "allow_missing": False},
                    "model": {"dtype": "float32", "param_dtype": "float32", "remat_policy": "none",
                              "attention_impl": "xla"}})
    tok = launch.load_tokenizer(c)  # the run's "tiny"
    assert launch.model_config(c, tok) == cfg
    got = launch.params_initializer(c, cfg)(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    _equal(got, params_at(params, 6))


def test_a_bare_params_folder_needs_its_config_json(tiny, tmp_path):
    import orbax.checkpoint as ocp

    cfg, params, _ = tiny
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "bare", params)
    with pytest.raises(ValueError, match="bare Orbax params folder .* set init.config_json"):
        restore.init_source(tmp_path / "bare")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    loc, got_cfg = restore.init_source(tmp_path / "bare", tmp_path / "cfg.json")
    assert loc is None and got_cfg == cfg
    got, _ = restore.init_params(tmp_path / "bare", cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                                 config_json=tmp_path / "cfg.json")
    _equal(got, params)

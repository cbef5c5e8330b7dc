"""Folder-kind detection: the four kinds, step choice in a training workdir, and errors that
name the path."""

import json

import pytest

from nvlm_jax.checkpoint import folders
from nvlm_jax.checkpoint.folders import CheckpointNotFoundError, locate


def _step(root, step, metric=None):
    d = root / "checkpoints" / str(step)
    (d / "state").mkdir(parents=True)
    (d / "config").mkdir()
    (d / "config" / "metadata").write_text(json.dumps({"checkpoint": {"best_metric": "m", "best_mode": "max"}}))
    meta = {"metrics": {}, "custom_metadata": {} if metric is None else {"metrics": {"m": metric}}}
    (d / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    return d


def test_hf_and_converted_folders(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert locate(hf).kind == "hf" and locate(hf).root == hf and locate(hf).params_dir is None
    ours = tmp_path / "ours"
    (ours / "params").mkdir(parents=True)
    (ours / "nvlm_config.json").write_text("{}")
    loc = locate(str(ours))
    assert (loc.kind, loc.step, loc.params_dir) == ("converted", None, ours / "params")
    with pytest.raises(ValueError, match="applies to training workdirs only"):
        locate(ours, step=3)


def test_a_workdir_picks_its_latest_complete_step_or_the_one_asked_for(tmp_path):
    for s in (2, 10, 4):
        _step(tmp_path, s)
    (tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    (tmp_path / "checkpoints" / "11.unusable").mkdir()  # set aside by a resume
    loc = locate(tmp_path)
    assert (loc.kind, loc.step, loc.step_dir) == ("workdir", 10, tmp_path / "checkpoints" / "10")
    assert loc.params_dir == tmp_path / "checkpoints" / "10" / "state" and loc.describe() == "training workdir, step 10"
    assert locate(tmp_path, step=4).step == 4
    with pytest.raises(CheckpointNotFoundError, match=r"no complete checkpoint for step 3; steps: \[2, 4, 10\]"):
        locate(tmp_path, step=3)


def test_best_follows_the_runs_keep_best_metric(tmp_path):
    _step(tmp_path, 2, 0.5)
    _step(tmp_path, 4, 0.9)
    _step(tmp_path, 6)
    assert locate(tmp_path, step="best").step == 4
    plain = tmp_path / "plain"
    _step(plain, 1)
    with pytest.raises(ValueError, match="saved with the keep-best metric 'm'"):
        locate(plain, step="best")


def test_a_step_folder_is_its_own_kind(tmp_path):
    d = _step(tmp_path, 7)
    loc = locate(d)
    assert (loc.kind, loc.step, loc.root, loc.step_dir) == ("step", 7, tmp_path, d)
    with pytest.raises(ValueError, match="pass its workdir instead"):
        locate(d, step="best")


def test_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=f"{tmp_path / 'nope'}: checkpoint path does not exist"):
        locate(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"{tmp_path}: not a checkpoint: expected a Hugging Face folder"):
        locate(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no complete training checkpoint"):
        locate(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="this is a file"):
        locate(tmp_path / "f")


def test_parse_step():
    assert [folders.parse_step(s) for s in ("latest", "BEST", "12", 3)] == ["latest", "best", 12, 3]
    with pytest.raises(ValueError, match="'latest', 'best' or a step number"):
        folders.parse_step("last")

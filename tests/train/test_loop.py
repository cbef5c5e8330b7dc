"""The training loop: exact resume, non-finite stop with the last good checkpoint intact,
metrics in JSONL and TensorBoard, evaluation and keep-best."""

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvlm_jax.config import tiny
from nvlm_jax.train import checkpoint, loop, metrics, optim, resume, tensorboard
from nvlm_jax.train.step import param_shapes
from tests.train import fakes

CFG = tiny("D")
# All tests share one configuration, so the jitted step is compiled once per process.
LOOP = dict(stage="sft", log_every=1, num_devices=1, peak_flops_per_device=1e11, seed=3)
OPTIM = optim.OptimConfig(lr_max=1e-3, lr_min=1e-4, warmup_steps=2, total_steps=20)


@functools.cache
def _params():
    return fakes.random_params(CFG, 3)


def _fresh_params(mesh):
    """The same random params for every run, initialised once (the loop donates its input)."""
    return jax.device_put(jax.tree_util.tree_map(jnp.copy, _params()), mesh.devices.flat[0])


def _train(workdir, num_steps, iterator=None, every=3, **kwargs):
    kwargs.setdefault("init_params", _fresh_params)
    return loop.train(
        CFG, loop.LoopConfig(num_steps=num_steps, **{**LOOP, **kwargs.pop("loop", {})}), OPTIM,
        checkpoint.CheckpointConfig(every=every, keep=2, keep_best=0), workdir,
        iterator or fakes.FakeIterator(CFG, batch_size=2), console=False, **kwargs,
    )


def _losses(workdir):
    records = [r for r in metrics.read_jsonl(workdir / metrics.METRICS_FILE) if "train/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in records}


def test_resumed_run_continues_the_loss_curve_exactly(tmp_path):
    straight = _train(tmp_path / "a", 6)
    assert straight.resumed_from is None and int(straight.state.step) == 6
    first = _train(tmp_path / "b", 3)
    second = _train(tmp_path / "b", 6)
    assert second.resumed_from == 3
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # bitwise: same floats
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                           second.state.params, straight.state.params)
    assert int(first.state.step) == 3
    done = _train(tmp_path / "b", 6)  # nothing left to do
    assert done.resumed_from == 6 and int(done.state.step) == 6


class _NaNAfter(fakes.FakeIterator):
    """Batches whose pixels are NaN from batch `start` on."""

    def __init__(self, start, **kwargs):
        super().__init__(CFG, **kwargs)
        self.start = start

    def __next__(self):
        index = self.index
        batch = super().__next__()
        if index >= self.start:
            batch["pixel_values"][:] = np.nan
        return batch


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    expected = r"2 consecutive steps \(up to step 5\).*Last good checkpoint: step 3"
    with pytest.raises(loop.NonFiniteError, match=expected):
        _train(tmp_path, 10, _NaNAfter(3, batch_size=2), every=1, loop=dict(max_nonfinite=2))
    ckpts = checkpoint.TrainCheckpoints(tmp_path / loop.CHECKPOINT_DIR, checkpoint.CheckpointConfig(keep_best=0))
    assert ckpts.latest_step() == 3
    ckpts.close()
    records = metrics.read_jsonl(tmp_path / metrics.METRICS_FILE)
    assert [r["train/finite"] for r in records if "train/finite" in r] == [1, 1, 1, 0, 0]
    assert records[-1]["train/nonfinite_total"] == 2


def test_metrics_go_to_jsonl_and_tensorboard_and_evaluation_is_logged(tmp_path):
    calls = []

    def evaluate(params, step):
        calls.append(step)
        return {"exact_match": step / 10}

    result = _train(tmp_path, 4, every=2, evaluate=evaluate, loop=dict(eval_every=2))
    assert calls == [2, 4] and result.last_eval == {"exact_match": 0.4}
    records = metrics.read_jsonl(tmp_path / metrics.METRICS_FILE)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "accuracy", "lr", "grad_norm", "step_time_s", "text_tokens_per_s", "image_tokens_per_s",
                "mfu", "loss_tokens"):
        assert f"train/{key}" in train[-1], key
    assert "train/first_step_s" in train[0]
    assert train[-1]["train/mfu"] > 0 and train[-1]["train/image_tokens_per_s"] > 0
    scalars = tensorboard.read_scalars(tmp_path / metrics.TENSORBOARD_DIR)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert scalars["train/loss"][-1][1] == pytest.approx(train[-1]["train/loss"])
    assert scalars["eval/exact_match"] == [(2, pytest.approx(0.2)), (4, pytest.approx(0.4))]


def test_init_params_callback_is_used_for_a_fresh_run(tmp_path):
    shapes = param_shapes(CFG)
    seen = []

    def init(mesh):
        seen.append(mesh.shape)
        return jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)

    result = _train(tmp_path, 1, init_params=init)
    assert seen and float(np.asarray(result.state.params["vision"]["patch_bias"])[0]) == pytest.approx(0.01)


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# The failed restore's abandoned Orbax reads must not print their tracebacks over the warning.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_is_kept_aside(tmp_path):
    straight = _train(tmp_path / "a", 6)
    _train(tmp_path / "b", 6)
    ckpt_dir = tmp_path / "b" / loop.CHECKPOINT_DIR
    victim = _largest_file(ckpt_dir / "6" / "state")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"checkpoint step 6 is unusable: .*cannot restore it"):
        again = _train(tmp_path / "b", 6)
    assert again.resumed_from == 3 and int(again.state.step) == 6
    assert (ckpt_dir / "6.unusable" / "WHY_UNUSABLE.txt").is_file()  # set aside, not deleted
    assert (ckpt_dir / "6" / "state").is_dir()  # saved again by the resumed run
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                           again.state.params, straight.state.params)


def test_a_checkpoint_without_its_data_state_is_not_resumed_from_the_start_of_the_data(tmp_path):
    _train(tmp_path, 6)
    data_dir = tmp_path / loop.CHECKPOINT_DIR / "6" / "data"
    for f in data_dir.iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match=r"step 6 is unusable: .*no data-iterator state"):
        again = _train(tmp_path, 6)
    assert again.resumed_from == 3


def test_a_changed_run_config_is_refused_with_the_list_of_changes_unless_allowed(tmp_path):
    run = {"stage": "sft", "data": {"batch_size": 2, "seq_len": 64, "tasks": {"colour": 1.0}}, "log_every": 1}
    _train(tmp_path, 3, run_config=run)
    changed = {"stage": "sft", "data": {"batch_size": 4, "seq_len": 64, "tasks": {"shape": 1.0}}, "log_every": 5}
    with pytest.raises(resume.ResumeConfigError) as e:
        _train(tmp_path, 6, run_config=changed)
    message = str(e.value)
    assert "data.batch_size: 2 -> 4" in message and "data.tasks.colour: 1.0 -> (absent)" in message
    assert "data.tasks.shape: (absent) -> 1.0" in message and "log_every" not in message
    assert "allow_resume_changes" in message
    resumed = _train(tmp_path, 4, run_config=changed, loop=dict(allow_resume_changes=True))
    assert resumed.resumed_from == 3 and int(resumed.state.step) == 4


def test_metrics_have_one_record_per_step_after_a_crash_between_checkpoints(tmp_path):
    _train(tmp_path, 6)
    shutil.rmtree(tmp_path / loop.CHECKPOINT_DIR / "6")  # as if killed after logging step 6, before saving it
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "train/lo')  # and mid-write
    again = _train(tmp_path, 6)
    assert again.resumed_from == 3
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_resuming_with_another_model_size_is_one_clear_error_and_renames_nothing(tmp_path):
    _train(tmp_path, 3)
    bigger = CFG.replace(llm=dataclasses.replace(CFG.llm, intermediate_size=CFG.llm.intermediate_size * 2))
    with pytest.raises(ValueError, match=r"no checkpoint of this run can be resumed from .*cannot restore it") as e:
        loop.train(bigger, loop.LoopConfig(num_steps=6, allow_resume_changes=True, **LOOP), OPTIM,
                   checkpoint.CheckpointConfig(every=3, keep=2, keep_best=0), tmp_path,
                   fakes.FakeIterator(bigger, batch_size=2), console=False)
    assert "Event loop is closed" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / loop.CHECKPOINT_DIR).iterdir()) == ["3"]  # nothing set aside
    again = _train(tmp_path, 4)  # the right model still resumes
    assert again.resumed_from == 3


class _OtherTasks(fakes.FakeIterator):
    """An iterator whose saved state belongs to another data mixture (as grain's would)."""

    def set_state(self, state):
        raise KeyError("next_index")


def test_a_data_state_that_does_not_fit_the_pipeline_is_named_not_a_key_error(tmp_path):
    _train(tmp_path, 3)
    with pytest.raises(ValueError, match=r"data-iterator state does not fit this run's data pipeline \(KeyError"):
        _train(tmp_path, 6, _OtherTasks(CFG, batch_size=2), loop=dict(allow_resume_changes=True))

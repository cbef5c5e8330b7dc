"""Eval runner: resumable predictions, summaries, batched answers, checkpoint loading, the CLIs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nvlm_jax import config as C
from nvlm_jax.data.pipeline import config_for_tokenizer
from nvlm_jax.eval import runner, tasks
from nvlm_jax.eval.tasks import Sample
from nvlm_jax.models.layer_layout import to_layout
from nvlm_jax.pretrained import NVLMModel
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer
from nvlm_jax.train.step import param_shapes
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeAnswerer:
    """Answers "ans-<id>" for question "q<id>"; records calls; can fail on a given call."""

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = [], fail_on_call

    def __call__(self, texts, images):
        self.calls.append(list(texts))
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt("killed")
        return [f"ans-{t.split('q', 1)[1]}" for t in texts]


def _samples(n):
    return [Sample(str(i), f"q{i}", (f"ans-{i}" if i % 2 == 0 else "wrong",)) for i in range(n)]


def _ids(out_dir, task="synthetic_ocr"):
    lines = (out_dir / f"{task}_predictions.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines]


TASK = tasks.get_task("synthetic_ocr")  # exact match


def test_an_interrupted_run_resumes_with_only_the_missing_samples(tmp_path):
    samples = _samples(7)
    killed = FakeAnswerer(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(TASK, samples, tmp_path, killed, model_name="m", batch_size=2, progress=False)
    assert _ids(tmp_path) == ["0", "1", "2", "3"]  # the two finished batches were written
    resumed = FakeAnswerer()
    summary = runner.evaluate(TASK, samples, tmp_path, resumed, model_name="m", batch_size=2, progress=False)
    assert [t for call in resumed.calls for t in call] == ["q4", "q5", "q6"]
    assert _ids(tmp_path) == [str(i) for i in range(7)]
    assert summary["count"] == 7 and summary["generated"] == 3
    assert summary["score"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    on_disk = json.loads((tmp_path / "synthetic_ocr_summary.json").read_text())
    assert on_disk["model"] == "m" and on_disk["task"] == "synthetic_ocr" and on_disk["score"] == summary["score"]


def test_a_limited_run_then_the_full_run_generates_only_the_rest(tmp_path):
    first = FakeAnswerer()
    runner.evaluate(TASK, _samples(3), tmp_path, first, model_name="m", batch_size=8, progress=False)
    second = FakeAnswerer()
    summary = runner.evaluate(TASK, _samples(5), tmp_path, second, model_name="m", batch_size=8, progress=False)
    assert second.calls == [["q3", "q4"]] and summary["count"] == 5
    again = FakeAnswerer()
    runner.evaluate(TASK, _samples(5), tmp_path, again, model_name="m", progress=False)
    assert again.calls == [] and sorted(_ids(tmp_path)) == [str(i) for i in range(5)]


def test_a_torn_last_line_is_cut_off_and_regenerated(tmp_path):
    runner.evaluate(TASK, _samples(2), tmp_path, FakeAnswerer(), model_name="m", progress=False)
    path = tmp_path / "synthetic_ocr_predictions.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "2", "predic')  # the process died here
    assert set(runner.read_predictions(path)) == {"0", "1"}
    assert path.read_text().endswith("}\n")
    rerun = FakeAnswerer()
    runner.evaluate(TASK, _samples(3), tmp_path, rerun, model_name="m", progress=False)
    assert rerun.calls == [["q2"]] and _ids(tmp_path) == ["0", "1", "2"]


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "0", "prediction": "a"}\nnot json\n{"id": "1", "prediction": "b"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: corrupt prediction record"):
        runner.read_predictions(path)


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    info = {"checkpoint": "/a", "max_new_tokens": 16}
    runner.evaluate(TASK, _samples(2), tmp_path, FakeAnswerer(), model_name="m", run_info=info, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens: was 16, now 32.*--overwrite"):
        runner.evaluate(TASK, _samples(2), tmp_path, FakeAnswerer(), model_name="m",
                        run_info=dict(info, max_new_tokens=32), progress=False)
    fresh = FakeAnswerer()
    runner.evaluate(TASK, _samples(2), tmp_path, fresh, model_name="m", run_info=dict(info, max_new_tokens=32),
                    overwrite=True, progress=False)
    assert fresh.calls == [["q0", "q1"]] and _ids(tmp_path) == ["0", "1"]


def test_ocrbench_score_is_a_count_out_of_1000():
    task = tasks.get_task("ocrbench")
    samples = [Sample(str(i), "q", ("abc",)) for i in range(4)]
    preds = {s.id: {"prediction": "it says ABC" if i < 3 else "no"} for i, s in enumerate(samples)}
    summary = runner.summarize(task, samples, preds, "m")
    assert summary["score"] == 750.0 and summary["correct"] == 3.0 and summary["count"] == 4


# ---- with a tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok_dir = make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer = load_tokenizer(tok_dir)
    cfg = config_for_tokenizer(C.tiny("D"), tokenizer)
    rng = np.random.default_rng(3)  # random params straight from the shapes (no init compile)
    params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), param_shapes(cfg))
    return NVLMModel(cfg, params, tokenizer)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_batched_answers_equal_one_at_a_time_chat(tiny):
    texts = ["<image>\nWhat colour is the shape?", "<image>\nWhat is written?", "What is 2 + 2?"]
    images = [[_image(28, 28, 0)], [_image(60, 30, 1)], []]  # 1 tile, 2 tiles + thumbnail, none
    answerer = runner.ModelAnswerer(tiny, max_new_tokens=4, batch_size=4)
    batched = answerer(texts, images)
    alone = [tiny.chat(imgs or None, text, max_new_tokens=4) for text, imgs in zip(texts, images, strict=True)]
    assert batched == alone and all(isinstance(a, str) for a in batched)


def test_a_training_workdir_loads_its_latest_checkpoint(tiny, tmp_path):
    import optax

    from nvlm_jax.train.checkpoint import CheckpointConfig, TrainCheckpoints
    from nvlm_jax.train.step import TrainState

    state = TrainState(step=jnp.int32(5), applied=jnp.int32(5), params=tiny.params, opt_state=optax.EmptyState(),
                       nonfinite_run=jnp.int32(0), nonfinite_total=jnp.int32(0))
    run_config = {"tokenizer": "tiny", "init": {"checkpoint": ""}, "model": tiny.config.to_dict()}
    ckpts = TrainCheckpoints(tmp_path / "checkpoints", CheckpointConfig(every=1, keep_best=0, async_save=False))
    ckpts.save(5, state, None, run_config)
    ckpts.close()
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save is ignored
    model = runner.load_model(tmp_path)
    assert model.source.step_dir == tmp_path / "checkpoints" / "5"
    assert model.config.layer_layout == "per_layer"  # load_pretrained's choice on CPU; stored stacked
    cfg, params = to_layout(model.params, model.config, "stacked")
    assert cfg == tiny.config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(tiny.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.tokenizer.encode("red circle").ids == tiny.tokenizer("red circle")["input_ids"]
    assert runner.load_model(tmp_path, dtype="bfloat16").params["llm"]["embed_tokens"].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runner.load_model(tmp_path / "nope")


@pytest.mark.slow
def test_eval_and_report_command_lines(tiny, tmp_path):
    from nvlm_jax import convert

    ckpt = convert.export_hf(tiny.params, tiny.config, tmp_path / "ckpt", tokenizer_dir=_tokenizer_dir(tiny, tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    _image(60, 30, 2).save(data / "a.png")
    records = [{"id": i, "image": "a.png", "question": f"Question {i}?", "answers": ["red"] * 10} for i in range(3)]
    (data / "textvqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    env = cpu_env(NVLM_JAX_CACHE_DIR="off")
    cmd = [sys.executable, "-m", "nvlm_jax.eval", f"--checkpoint={ckpt}", "--task=textvqa",
           f"--data={data / 'textvqa.jsonl'}", f"--out_dir={out}", "--batch_size=2", "--max_new_tokens=3",
           "--model_name=tiny", "--dtype=float32", "--noprogress"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["count"] == 3 and summary["generated"] == 3 and summary["task"] == "textvqa"
    assert summary["model"] == "tiny" and summary["metric"] == "vqa_accuracy" and summary["max_new_tokens"] == 3
    assert len((out / "textvqa_predictions.jsonl").read_text().splitlines()) == 3
    table = tmp_path / "table.md"
    done = subprocess.run([sys.executable, "-m", "nvlm_jax.eval.report", f"--summaries={out}", f"--out={table}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny |" in table.read_text() and "| NVLM-D 1.0 72B (paper) |" in table.read_text()


def _tokenizer_dir(model, tmp_path):
    folder = tmp_path / "tok"
    model.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/no/such/run", "--task=synthetic_ocr"], "/no/such/run: checkpoint path does not exist"),
    (["--checkpoint={ckpt}", "--task=nope"], "unknown eval task 'nope'"),
    (["--checkpoint={ckpt}", "--task=textvqa", "--data=missing.jsonl"], "--data missing.jsonl: no such file"),
])
def test_eval_cli_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    from tests import hf_checkpoint

    env = cpu_env(NVLM_JAX_CACHE_DIR="off")
    cmd = [sys.executable, "-m", "nvlm_jax.eval", *[a.format(ckpt=hf_checkpoint.tiny_converted()) for a in args]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1

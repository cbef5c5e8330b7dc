"""experiments/configs/finetune.py: fine-tuning a checkpoint on files named on the command line
(arch, tokenizer and prompt format from the checkpoint; eval tasks from data.eval), and the
launcher running it end to end on the shipped example data."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from nvlm_jax.checkpoint import restore
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.train import launch, metrics
from tests.checkpoint.workdir import tiny_model, write_workdir

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "finetune.py"
DATA = ROOT / "experiments" / "data"


def _config(**data):
    spec = importlib.util.spec_from_file_location("finetune_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for key, value in data.items():
        setattr(c.data, key, value)
    return c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny NVLM-X training workdir saved with its own prompt format (2-D grid tags, a system message)."""
    workdir = tmp_path_factory.mktemp("init")
    cfg, params, _ = tiny_model("X")
    fmt = PromptFormat.for_model(cfg, tag_style="2d_grid", system_message="Answer in one word.")
    write_workdir(workdir, cfg, params, prompt_format=fmt)
    return workdir, fmt


def test_the_model_tokenizer_and_prompt_format_come_from_the_checkpoint(checkpoint):
    workdir, fmt = checkpoint
    c = _config(train=str(DATA / "train.jsonl"), eval=str(DATA / "eval.jsonl"))
    c.init.checkpoint = str(workdir)
    tokenizer = launch.load_tokenizer(c)
    cfg = launch.model_config(c, tokenizer)
    assert cfg.arch == "X" and launch.tokenizer_spec(c) == "tiny"
    assert launch.prompt_format(c, cfg) == fmt
    c.data.prompt_format = ""
    assert launch.prompt_format(c, cfg).system_message is None  # data.system_message "" = no system turn


def test_train_and_eval_entries_become_weighted_sources_and_eval_tasks(checkpoint, tmp_path):
    workdir, _ = checkpoint
    (tmp_path / "more.jsonl").write_text((DATA / "train.jsonl").read_text())
    c = _config(train=f"{DATA / 'train.jsonl'}:3,{tmp_path / 'more.jsonl'}", eval=str(DATA / "eval.jsonl"),
                image_root=str(DATA))
    c.init.checkpoint = str(workdir)
    tokenizer = launch.load_tokenizer(c)
    cfg = launch.model_config(c, tokenizer)
    assert launch.data_config(c, cfg).weights == {"train": 3.0, "more": 1.0}
    assert launch.eval_tasks(c) == ["eval"]
    (held_out,) = launch.data_config(c, cfg, only="eval").sources
    assert held_out.paths == {"eval": str(DATA / "eval.jsonl")} and held_out.image_root == str(DATA)
    c.data.eval = ""
    assert launch.eval_tasks(c) == [] and launch.make_evaluator(c, cfg, tokenizer) is None


def test_a_files_run_without_train_data_or_checkpoint_is_a_named_error(checkpoint):
    c = _config()
    with pytest.raises(ValueError, match="config.arch is empty"):
        launch.model_config(c, None)
    c.init.checkpoint = str(checkpoint[0])
    tokenizer = launch.load_tokenizer(c)
    with pytest.raises(ValueError, match="data.kind 'files' needs data.train"):
        launch.data_config(c, launch.model_config(c, tokenizer))


@pytest.mark.slow
def test_train_py_fine_tunes_a_checkpoint_on_the_shipped_example(tmp_path):
    init = tmp_path / "init"
    cfg, params, _ = tiny_model("D")
    write_workdir(init, cfg, params)
    workdir = tmp_path / "finetune"
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), f"--config={CONFIG}",
           f"--config.init.checkpoint={init}", f"--config.data.train={DATA / 'train.jsonl'}",
           f"--config.data.eval={DATA / 'eval.jsonl'}", f"--config.data.image_root={DATA}", f"--workdir={workdir}",
           "--config.num_steps=2", "--config.optim.warmup_steps=1", "--config.data.seq_len=64",
           "--config.data.tiles_per_row=1", "--config.data.batch_size=4", "--config.data.num_workers=0",
           "--config.model.dtype=float32",
           "--config.model.remat_policy=none", "--config.eval.samples_per_task=3", "--config.eval.batch_size=4",
           "--config.mesh.num_devices=1", "--config.peak_flops_per_device=1e11", "--config.log_every=1",
           "--config.checkpoint.async_save=False", "--quiet"]
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "finished step 2" in out.stdout
    assert "trainable (stage sft)" in out.stderr
    records = list(metrics.read_jsonl(workdir / metrics.METRICS_FILE))
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    final = [r for r in records if "eval/exact_match/eval" in r]
    assert final and 0.0 <= final[-1]["eval/exact_match/eval"] <= 1.0 and final[-1]["eval/loss"] > 0
    info = restore.read_info(workdir)
    assert info.tokenizer == "tiny"  # the init run's: chat and eval load the fine-tuned run as it is
    saved = info.run_config
    assert saved["data"]["train"] == str(DATA / "train.jsonl") and saved["data"]["kind"] == "files"


def test_the_readme_example_names_real_files_and_config_keys():
    """README's "Fine-tune on your own data" block: every --config.KEY exists in the finetune
    config and every repository path it names exists (the block itself was run by hand: see
    BUILD_NOTES)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Fine-tune on your own data"):]
    block = section[section.index("```bash\n") + 8:section.index("```", section.index("```bash\n") + 8)]
    assert len(block.strip().splitlines()) == 5
    c = _config()
    keys = [arg.split("=")[0][len("--config."):] for arg in block.split() if arg.startswith("--config.")]
    assert "init.checkpoint" in keys and "data.train" in keys and "data.eval" in keys and "data.image_root" in keys
    for key in keys:
        node = c
        for part in key.split("."):
            assert part in node, f"README sets --config.{key}, which the finetune config lacks"
            node = node[part]
    paths = [arg.split("=", 1)[1] for arg in block.split() if "=experiments/" in arg]
    assert paths and all((ROOT / p).exists() for p in paths), paths

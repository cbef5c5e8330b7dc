"""`experiments/train.py` end to end in subprocesses: flags, and a run killed with SIGKILL while
saving resumes from its last complete checkpoint with exactly the same loss curve (also with LoRA
adapters and adapter dropout)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvlm_jax.train import metrics
from tests.cpu_env import cpu_env

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "experiments" / "train.py"
STEPS = 10
# A small, fast run: tiny model sizes, single device, no evaluation, a save every 2 steps.
OVERRIDES = [
    f"--config.num_steps={STEPS}", "--config.log_every=1", "--config.eval.samples_per_task=0",
    "--config.checkpoint.every=2", "--config.checkpoint.keep=3", "--config.optim.warmup_steps=2",
    "--config.data.batch_size=4", "--config.data.seq_len=40", "--config.data.tiles_per_row=1",
    "--config.model.llm.hidden_size=64", "--config.model.llm.intermediate_size=128",
    "--config.model.llm.head_dim=16", "--config.model.vision.hidden_size=32",
    "--config.model.vision.intermediate_size=64", "--config.model.vision.num_heads=2",
    "--config.data.num_workers=0", "--config.mesh.num_devices=1", "--config.peak_flops_per_device=1e11", "--quiet",
]


def _env():
    return cpu_env()  # one CPU device, like a plain run


# LoRA on the LLM and the ViT (their bases frozen), dropout keyed by the step; the projector trains fully.
LORA = ["--config.lora.rank=4", "--config.lora.dropout=0.1", "--config.lora.targets=llm,vision"]


def _launch(workdir: Path, cache: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, str(TRAIN), f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}",
           f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}", *OVERRIDES, *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(workdir: Path) -> dict[int, float]:
    by_step = {}
    path = workdir / metrics.METRICS_FILE
    for r in metrics.read_jsonl(path) if path.exists() else []:
        if "train/loss" in r:
            by_step[r["step"]] = r["train/loss"]  # replayed steps are logged again: keep the last
    return by_step


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, str(TRAIN), "--help"], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert "--config" in out.stdout and "--workdir" in out.stdout and "resumes from the workdir" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), tuple(LORA)], ids=["full", "lora"])
def test_sigkill_during_a_save_resumes_with_the_same_loss_curve(tmp_path, extra):
    cache = tmp_path / "xla_cache"  # restarts reuse the compiled programs (same numbers, less time)
    straight = tmp_path / "straight"
    _finish(_launch(straight, cache, extra))
    expected = _losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))

    interrupted = tmp_path / "interrupted"
    proc = _launch(interrupted, cache, extra)
    deadline = time.time() + 300
    # Step 6's record is written just before its checkpoint save starts: kill right then.
    while max(_losses(interrupted), default=0) < 6:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the run did not reach step 6"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    # Saves are asynchronous: step 6's (or even step 4's) may still have been in flight.
    assert steps and steps[-1] in (2, 4, 6), steps

    out = _finish(_launch(interrupted, cache, extra))
    assert f"resumed from {interrupted / 'checkpoints' / str(steps[-1])}" in out
    assert _losses(interrupted) == expected  # bitwise equal f32 losses, every step
    assert "finished step 10" in out

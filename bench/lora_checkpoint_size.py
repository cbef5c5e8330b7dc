"""Bytes per training checkpoint of a LoRA run: the trainable params only (what the loop writes
now, `nvlm_jax.checkpoint.frozen_base`) vs the whole TrainState (what it wrote before), in one
run; plus the same arithmetic from the shapes of NVLM-D-72B.

A tiny LoRA fine-tune (the main job's tiny model shape, `experiments/configs/tiny.py`, from
scratch, stage "sft": LLM adapters + the projector train, ViT and LLM base frozen) runs 2 steps and
saves; its final TrainState is then saved whole with `TrainCheckpoints` next to it (the former
layout), and both folders are measured on disk.

    python bench/lora_checkpoint_size.py [--rank 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib.util  # noqa: E402

import jax  # noqa: E402

from nvlm_jax import config as C  # noqa: E402
from nvlm_jax.checkpoint import folders, frozen_base  # noqa: E402
from nvlm_jax.train import checkpoint as ckpt_lib  # noqa: E402
from nvlm_jax.train import freeze, launch  # noqa: E402
from nvlm_jax.train.step import param_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tiny_config(rank: int):
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "experiments" / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.stage, c.num_steps, c.log_every, c.optim.warmup_steps = "sft", 2, 1, 1
    c.eval.samples_per_task = 0
    c.checkpoint.every, c.checkpoint.keep_best, c.checkpoint.async_save = 2, 0, False
    c.data.batch_size, c.data.num_workers = 8, 0
    c.mesh.num_devices, c.peak_flops_per_device = 1, 1e11
    c.lora.rank, c.lora.alpha, c.lora.targets = rank, 2.0 * rank, "llm"
    return c


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rank_72b", type=int, default=64)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lora_ckpt_size_"))

    c = _tiny_config(args.rank)
    result = launch.train(c, workdir / "lora", console=False)
    step_dir = workdir / "lora" / "checkpoints" / "2"
    run_config = folders.read_run_config(step_dir)
    assert frozen_base.RECORD_KEY in run_config, "the LoRA run saved its whole params"
    whole = ckpt_lib.TrainCheckpoints(workdir / "whole" / "checkpoints",
                                      ckpt_lib.CheckpointConfig(every=1, keep=1, keep_best=0, async_save=False))
    whole.save(2, result.state, None, {k: v for k, v in run_config.items() if k != frozen_base.RECORD_KEY})
    whole.close()
    after, before = _bytes(step_dir), _bytes(workdir / "whole" / "checkpoints" / "2")
    mask = freeze.trainable_mask(result.state.params, "D", "sft")
    trainable, frozen = freeze.partition(result.state.params, mask)

    print(f"# bench/lora_checkpoint_size.py, {datetime.date.today()}, {platform.machine()}, jax {jax.__version__}")
    print(f"tiny LoRA r{args.rank} (stage sft, LLM adapters + projector trained): params "
          f"{freeze.count_params(result.state.params):,}, trainable {freeze.count_params(trainable):,}, "
          f"frozen base {freeze.count_params(frozen):,} ({_tree_bytes(frozen):,} bytes in memory)")
    print(f"  bytes per checkpoint: whole TrainState {before:,}  ->  trainable only {after:,} "
          f"({after / before:.3f}x)")

    # NVLM-D-72B, rank-R LoRA on the LLM, stage sft, bf16 base: from the shapes (nothing allocated).
    big = C.nvlm_d_72b().replace(param_dtype="bfloat16", dtype="bfloat16",
                                 lora=C.LoraConfig(rank=args.rank_72b, alpha=2.0 * args.rank_72b, targets=("llm",)))
    shapes = param_shapes(big)
    t, f = freeze.partition(shapes, freeze.trainable_mask(shapes, "D", "sft"))
    adam = 2 * sum(x.size * 4 for x in jax.tree_util.tree_leaves(t))  # f32 moments of the trainable params
    print(f"NVLM-D-72B LoRA r{args.rank_72b} (stage sft, from shapes): trainable {_tree_bytes(t) / 1e9:.2f} GB "
          f"+ Adam {adam / 1e9:.2f} GB per checkpoint; the frozen base not written: {_tree_bytes(f) / 1e9:.1f} GB")


if __name__ == "__main__":
    main()

"""Trains NVLM as a config file says; resumes from the workdir's checkpoints when it has some.

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny
    python experiments/train.py --config=experiments/configs/tiny.py:X --config.num_steps=100 --workdir=...
    python experiments/train.py --config=experiments/configs/paper.py:D,72b,sft \\
        --config.init.checkpoint=/ckpt/nvlm_d_72b --config.data.root=/data/nvlm --workdir=...
    python experiments/train.py --config=experiments/configs/finetune.py --config.init.checkpoint=MODEL \\
        --config.data.train=a.jsonl:3,b.json --config.data.eval=eval.jsonl --config.data.image_root=DIR --workdir=...

Writes `metrics.jsonl`, `tensorboard/` event files and `checkpoints/` into the workdir. The
logic lives in `nvlm_jax.train.launch`; this file only parses flags.

Multi-host: start the same command once per process, with the same config and a workdir all
processes see (shared filesystem or bucket), and say how the processes find each other, by
flags or by environment variables, e.g. two processes on one machine (CPU: 4 devices each):

    export XLA_FLAGS=--xla_force_host_platform_device_count=4
    python experiments/train.py ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0 &
    python experiments/train.py ... --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=1

    JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python experiments/train.py ...

On Cloud TPU VMs and under SLURM or Open MPI, `--distributed=auto` lets JAX find the processes
itself. Each process reads its share of the global batch (`--config.data.num_shards`: see
`nvlm_jax.train.multihost`), all of them save and restore the checkpoints, and only process 0
writes metrics and the console output.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvlm_jax import cli, distributed, host_memory  # noqa: E402
from nvlm_jax.train import launch  # noqa: E402

distributed.define_flags()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (experiments/configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and TensorBoard events.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar on the console.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_logging()  # Orbax logs every save at INFO, and warns about its own layout
    host_memory.keep_freed_memory()  # if $NVLM_JAX_HOST_MALLOC=keep; before the backend starts
    logging.getLogger("nvlm_jax").setLevel(logging.INFO)
    distributed.initialize(distributed.from_flags())  # before anything touches a JAX backend
    result = launch.train(_CONFIG.value, _WORKDIR.value, console=not _QUIET.value)
    if jax.process_index() == 0:  # every process has the same result
        summary = {k: round(v, 4) for k, v in {**result.last_train, **result.last_eval}.items()
                   if k in ("loss", "accuracy", "exact_match", "step_time_s", "mfu")}
        print(f"finished step {int(result.state.step)}: {summary}")


if __name__ == "__main__":
    app.run(main)

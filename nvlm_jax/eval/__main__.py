"""Evaluates a checkpoint on one benchmark or synthetic task.

    python -m nvlm_jax.eval --checkpoint=DIR --task=textvqa --data=textvqa_val.jsonl --out_dir=eval_out
    python -m nvlm_jax.eval --checkpoint=runs/main --task=synthetic_colour --limit=200
    python -m nvlm_jax.eval.report --summaries=eval_out --out=table.md

`--checkpoint`: a converted folder, a Hugging Face NVLM-D folder, or a training workdir (its
latest checkpoint, or `--step=best` / a number) / `checkpoints/<step>` folder; prompts follow
the checkpoint's saved prompt format. Mistakes (a checkpoint or data file that is not there, an
unknown task) are one line on stderr and exit status 2, before the model loads; `--verbosity=0`
shows the libraries' INFO logs. Tasks, prompts and the data format:
`nvlm_jax/eval/tasks.py`; output files and resuming: `nvlm_jax/eval/runner.py`. Rerunning the
same command after an interruption generates only the samples that have no prediction yet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from nvlm_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("checkpoint", None, "Converted / Hugging Face folder, or a training workdir or step folder.")
    flags.DEFINE_string("step", "latest", "Training workdir: 'latest', 'best' (its keep-best metric) or a step.")
    flags.DEFINE_string("task", None, "Task name (vqav2, textvqa, chartqa, docvqa, infovqa, ai2d, mmmu, mathvista, "
                        "realworldqa, ocrbench, synthetic_<name>).")
    flags.DEFINE_string("data", None, "The task's JSONL file (not for synthetic tasks).")
    flags.DEFINE_string("out_dir", "eval_results", "Folder for <task>_predictions.jsonl and <task>_summary.json.")
    flags.DEFINE_string("model_name", None, "Name of the model in the summary (default: the checkpoint folder's name).")
    flags.DEFINE_integer("batch_size", 8, "Samples per generate call.")
    flags.DEFINE_integer("max_new_tokens", 0, "Longest answer in tokens (0: the task's default).")
    flags.DEFINE_integer("limit", 0, "Evaluate the first N samples only (synthetic: draw N; default 100).")
    flags.DEFINE_string("dtype", None, "Params/compute dtype (default: the checkpoint's own).")
    flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Weight-only quantized Linear kernels.")
    flags.DEFINE_integer("seed", 0, "Synthetic tasks: the data seed (the training data's seed by default).")
    flags.DEFINE_integer("tensor_parallel", 0, "Devices on the mesh's tensor axis (rest on fsdp); 0 = automatic "
                         "when there are several devices.")
    flags.DEFINE_bool("overwrite", False, "Discard this task's earlier predictions in --out_dir and start over.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["checkpoint", "task"])


def _mesh(located):
    import jax

    from nvlm_jax.sharding import make_mesh

    if FLAGS.tensor_parallel:
        return make_mesh(data=1, fsdp=-1, tensor=FLAGS.tensor_parallel)
    if jax.device_count() == 1 or located.is_training:
        return None  # small training runs: one device
    from nvlm_jax.pretrained import choose_mesh, read_config

    return choose_mesh(read_config(located.path), jax.device_count())


def _check_flags():
    """The checkpoint, task and data file, checked before anything loads (`cli.UserError`)."""
    from nvlm_jax.checkpoint.folders import locate, parse_step
    from nvlm_jax.checkpoint.paths import as_path
    from nvlm_jax.eval import tasks

    try:
        located = locate(FLAGS.checkpoint, parse_step(FLAGS.step))
        task = tasks.get_task(FLAGS.task)
    except ValueError as e:  # CheckpointNotFoundError included
        raise cli.UserError(str(e)) from None
    if FLAGS.data and not as_path(FLAGS.data).is_file():
        raise cli.UserError(f"--data {FLAGS.data}: no such file")
    if task.needs_data and not FLAGS.data:
        raise cli.UserError(f"task {task.name!r} needs --data=PATH.jsonl (format: nvlm_jax/eval/tasks.py)")
    if FLAGS.limit < 0 or FLAGS.batch_size < 1 or FLAGS.max_new_tokens < 0:
        raise cli.UserError("--limit and --max_new_tokens must be >= 0 and --batch_size >= 1")
    return located


def main(argv: Sequence[str]) -> None:
    del argv
    located = _check_flags()
    from nvlm_jax.compile_cache import enable_compilation_cache
    from nvlm_jax.eval import runner

    enable_compilation_cache()
    step = located.step if located.kind == "workdir" else "latest"
    model = runner.load_model(located.path, FLAGS.dtype, _mesh(located), step=step, quantize=FLAGS.quantize)
    summary = runner.run(
        FLAGS.checkpoint, FLAGS.task, FLAGS.data, FLAGS.out_dir, model_name=FLAGS.model_name,
        batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens, limit=FLAGS.limit, dtype=FLAGS.dtype,
        seed=FLAGS.seed, overwrite=FLAGS.overwrite, progress=FLAGS.progress, model=model,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    cli.run(main)

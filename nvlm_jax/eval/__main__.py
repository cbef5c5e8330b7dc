"""Evaluates a checkpoint on one benchmark or synthetic task.

    python -m nvlm_jax.eval --checkpoint=DIR --task=textvqa --data=textvqa_val.jsonl --out_dir=eval_out
    python -m nvlm_jax.eval --checkpoint=runs/main --task=synthetic_colour --limit=200
    python -m nvlm_jax.eval.report --summaries=eval_out --out=table.md

`--checkpoint`: a converted folder, a Hugging Face NVLM-D folder, or a training workdir (its
latest checkpoint) / `checkpoints/<step>` folder. Tasks, prompts and the data format:
`nvlm_jax/eval/tasks.py`; output files and resuming: `nvlm_jax/eval/runner.py`. Rerunning the
same command after an interruption generates only the samples that have no prediction yet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("checkpoint", None, "Converted / Hugging Face folder, or a training workdir or step folder.")
    flags.DEFINE_string("task", None, "Task name (vqav2, textvqa, chartqa, docvqa, infovqa, ai2d, mmmu, mathvista, "
                        "realworldqa, ocrbench, synthetic_<name>).")
    flags.DEFINE_string("data", None, "The task's JSONL file (not for synthetic tasks).")
    flags.DEFINE_string("out_dir", "eval_results", "Folder for <task>_predictions.jsonl and <task>_summary.json.")
    flags.DEFINE_string("model_name", None, "Name of the model in the summary (default: the checkpoint folder's name).")
    flags.DEFINE_integer("batch_size", 8, "Samples per generate call.")
    flags.DEFINE_integer("max_new_tokens", 0, "Longest answer in tokens (0: the task's default).")
    flags.DEFINE_integer("limit", 0, "Evaluate the first N samples only (synthetic: draw N; default 100).")
    flags.DEFINE_string("dtype", None, "Params/compute dtype (default: the checkpoint's own).")
    flags.DEFINE_integer("seed", 0, "Synthetic tasks: the data seed (the training data's seed by default).")
    flags.DEFINE_integer("tensor_parallel", 0, "Devices on the mesh's tensor axis (rest on fsdp); 0 = automatic "
                         "when there are several devices.")
    flags.DEFINE_bool("overwrite", False, "Discard this task's earlier predictions in --out_dir and start over.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["checkpoint", "task"])


def _mesh():
    import jax

    from nvlm_jax.sharding import make_mesh

    if FLAGS.tensor_parallel:
        return make_mesh(data=1, fsdp=-1, tensor=FLAGS.tensor_parallel)
    if jax.device_count() == 1:
        return None
    from nvlm_jax.eval.runner import training_step_dir
    from nvlm_jax.pretrained import choose_mesh, read_config

    if training_step_dir(FLAGS.checkpoint) is not None:
        return None  # small training runs: one device
    return choose_mesh(read_config(FLAGS.checkpoint), jax.device_count())


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nvlm_jax.compile_cache import enable_compilation_cache
    from nvlm_jax.eval import runner

    enable_compilation_cache()
    summary = runner.run(
        FLAGS.checkpoint, FLAGS.task, FLAGS.data, FLAGS.out_dir, model_name=FLAGS.model_name,
        batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens, limit=FLAGS.limit, dtype=FLAGS.dtype,
        seed=FLAGS.seed, mesh=_mesh(), overwrite=FLAGS.overwrite, progress=FLAGS.progress,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)

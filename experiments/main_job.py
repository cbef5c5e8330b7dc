"""The main job: train a tiny NVLM from scratch on the built-in synthetic tasks (CPU, minutes),
report held-out exact-match accuracy per task, and ask the trained model about a new image.

    python experiments/main_job.py                      # NVLM-D, experiments/configs/tiny.py
    python experiments/main_job.py --config.arch=X      # or H
    python experiments/main_job.py --workdir=/tmp/nvlm_main --config.num_steps=300

The image is a fresh synthetic one from the "test" split (never trained on); it is saved as
`question.png` in the workdir. A workdir that already holds the final checkpoint is resumed
(nothing left to train): delete it to retrain.
"""

import json
import logging
import os
import sys
import tempfile
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nvlm_jax import host_memory  # noqa: E402
from nvlm_jax.data import synthetic  # noqa: E402
from nvlm_jax.train import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "experiments", "configs", "tiny.py"), "Run config (default: the tiny config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: a new temporary folder).")
_TASK = flags.DEFINE_string("question_task", "colour", "Synthetic task of the image to ask about.")
_INDEX = flags.DEFINE_integer("question_index", 0, "Index of that image within the task's test split.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory()  # if $NVLM_JAX_HOST_MALLOC=keep; before the backend starts
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("nvlm_jax").setLevel(logging.INFO)
    c = _CONFIG.value
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix=f"nvlm_main_{c.arch}_")
    start = time.perf_counter()
    run = launch.prepare(c)
    result = launch.train(c, workdir, run=run)
    wall = time.perf_counter() - start

    if not result.last_eval:  # resumed a finished run: evaluate now
        result.last_eval = dict(run.evaluator(result.state.params, int(result.state.step))) if run.evaluator else {}
    index = synthetic.split_indices("test", _INDEX.value + 1)[_INDEX.value]
    example = synthetic.make_example(_TASK.value, index, seed=c.data.seed, tile_size=run.model.vision.image_size)
    image_path = os.path.join(workdir, "question.png")
    if example.image is not None:
        example.image.save(image_path)
    answer = launch.ask(run, result.state.params, example.image, example.question)
    total = time.perf_counter() - start

    print(f"\nNVLM-{c.arch} (tiny, {c.num_steps} steps, stage {c.stage}): trained and evaluated in {wall:.0f} s, "
          f"{total:.0f} s in all; workdir {workdir}")
    print("held-out exact match per task:")
    for key, value in sorted(result.last_eval.items()):
        if key.startswith("exact_match/"):
            print(f"  {key.split('/', 1)[1]:>14}: {value:.1%}")
    if "exact_match" in result.last_eval:
        print(f"  {'mean':>14}: {result.last_eval['exact_match']:.1%}")
    print(f"question about {image_path if example.image is not None else 'no image'}: {example.question!r}")
    print(f"  model answer: {answer!r}   reference: {example.answer!r}")
    summary = {"arch": c.arch, "steps": c.num_steps, "train_eval_s": round(wall, 1), "total_s": round(total, 1),
               "eval": result.last_eval,
               "question": example.question, "answer": answer, "reference": example.answer}
    with open(os.path.join(workdir, "main_job.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    app.run(main)

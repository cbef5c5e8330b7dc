"""LoRA demo: teach the main job's tiny model a question it has never seen, from JSONL files.

    python experiments/lora_demo.py --init=runs/main --workdir=runs/lora_demo

The main job trained the tiny NVLM-D on "What colour is the shape?" and "What shape is this?".
This writes a new question type as plain files, the way a user's own data arrives (PNG images
and LLaVA-style JSONL under `<workdir>/data`): a shape of one colour on a background of another,
"What colour is the background?". The main job only ever saw grey backgrounds and was asked the
shape's colour, so out of the box it names the shape's colour; the answers are colour words it
already says. (New answer words would need the frozen embedding and output rows of tokens it
never saw: a job for full fine-tuning, not adapters.)
It then fine-tunes with LoRA adapters only (`experiments/configs/finetune.py`, rank 8 on the
LLM's attention and MLP and on the projector; every base weight frozen), reports the held-out
exact match and the wall time, and checks that the base weights are bit-identical to the init
checkpoint's. Results go to `<workdir>/lora_demo.json`.
"""

import json
import logging
import os
import sys
import time

import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))

import finetune  # noqa: E402

from nvlm_jax import host_memory  # noqa: E402
from nvlm_jax.data import synthetic  # noqa: E402
from nvlm_jax.models import lora  # noqa: E402
from nvlm_jax.train import launch  # noqa: E402

_INIT = flags.DEFINE_string("init", "runs/main", "The trained model to adapt (the main job's workdir).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/lora_demo", "Output folder (data, checkpoints, results).")
_STEPS = flags.DEFINE_integer("steps", 150, "Fine-tuning steps.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank.")
_TRAIN = flags.DEFINE_integer("train_size", 2000, "Training examples written.")
_EVAL = flags.DEFINE_integer("eval_size", 200, "Held-out examples written (evaluated at the end).")
_TARGETS = flags.DEFINE_string("targets", "llm,projector", "LoRA targets (nvlm_jax/config.py LoraConfig).")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")

QUESTION = "What colour is the background?"


def draw(rng: np.random.Generator, size: int = 28, scale: int = 4) -> tuple[Image.Image, str]:
    """A shape of one colour on a background of another (drawn at 4x and box-downsampled, like
    the main job's images); returns the image and the background's colour name."""
    names = list(synthetic.COLOURS)
    back, front = (names[int(k)] for k in rng.choice(len(names), size=2, replace=False))
    full = size * scale
    canvas = Image.new("RGB", (full, full), synthetic.COLOURS[back])
    d = ImageDraw.Draw(canvas)
    side = float(rng.uniform(0.7, 0.85)) * full  # the shape covers most of the image
    x0, y0 = float(rng.uniform(0, full - side)), float(rng.uniform(0, full - side))
    box = (x0, y0, x0 + side, y0 + side)
    fill = synthetic.COLOURS[front]
    shape = int(rng.integers(3))
    if shape == 0:
        d.ellipse(box, fill=fill)
    elif shape == 1:
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX), back


def write_task(folder: str, split: str, count: int, seed: int) -> str:
    """`count` images under `folder/images` and `folder/<split>.jsonl` (LLaVA conversations)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, f"{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            image, back = draw(rng)
            name = f"images/{split}_{i:05d}.png"
            image.save(os.path.join(folder, name))
            record = {"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": back}]}
            f.write(json.dumps(record) + "\n")
    return path


def demo_config(init: str, data: str, steps: int, rank: int, eval_size: int, targets: str = "llm,projector",
                lr: float = 3e-3):
    """The fine-tuning run: `finetune.py` sized for the tiny CPU model, LoRA on LLM + projector."""
    c = finetune.get_config()
    c.init.checkpoint = init
    c.data.train = os.path.join(data, "train.jsonl")
    c.data.eval = os.path.join(data, "eval.jsonl")
    c.data.image_root = data
    c.num_steps = steps
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.model.attention_impl = "xla"
    c.data.batch_size = 48
    c.data.seq_len = 40
    c.data.tiles_per_row = 1
    c.data.read_threads = 0
    c.eval.every = 0  # at the end
    c.eval.samples_per_task = eval_size
    c.eval.batch_size = 48
    c.optim.lr_max, c.optim.lr_min, c.optim.warmup_steps = lr, lr / 10, 10
    c.optim.weight_decay = 0.0
    c.checkpoint.every = 50
    c.lora.rank = rank
    c.lora.alpha = 2.0 * rank
    c.lora.targets = targets
    return c


def base_score(c) -> dict[str, float]:
    """The held-out metrics of the init model itself, before any fine-tuning (same evaluator)."""
    import jax

    from nvlm_jax.train import loop

    base = c.copy_and_resolve_references()
    base.lora.rank = 0
    run = launch.prepare(base)
    mesh = loop.build_mesh(launch.loop_config(base))
    params = launch.params_initializer(base, run.model)(mesh)
    with jax.set_mesh(mesh):
        return dict(run.evaluator(params, 0))


def base_weights_unchanged(init: str, workdir: str) -> bool:
    """Every base weight of the fine-tuned checkpoint equals the init checkpoint's, bit for bit."""
    from nvlm_jax.checkpoint import restore

    tuned = restore.read_info(workdir)
    tuned_params = restore.load_our_params(tuned.located, tuned.config)
    source = restore.read_info(init)
    init_params = restore.load_our_params(source.located, source.config)
    a = lora.without_adapters(tuned_params)
    flat_a = dict(_flat(a))
    flat_b = dict(_flat(init_params))
    return flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


def run(init: str, workdir: str, steps: int, rank: int, train_size: int, eval_size: int,
        targets: str = "llm,projector", lr: float = 3e-3) -> dict:
    t0 = time.perf_counter()
    data = os.path.join(workdir, "data")
    if not os.path.exists(os.path.join(data, "eval.jsonl")):
        write_task(data, "train", train_size, seed=1)
        write_task(data, "eval", eval_size, seed=2)
    c = demo_config(init, data, steps, rank, eval_size, targets, lr)
    before = base_score(c)
    start = time.perf_counter()  # the fine-tune itself: data already written, base already scored
    result = launch.train(c, os.path.join(workdir, "run"))
    wall = time.perf_counter() - start
    data_s = start - t0
    summary = {
        "task": QUESTION, "steps": steps, "rank": rank, "targets": targets, "lr": lr,
        "held_out_before": before,
        "held_out": {k: v for k, v in result.last_eval.items()},
        "fine_tune_wall_s": round(wall, 1),
        "data_and_base_score_s": round(data_s, 1),
        "base_bit_identical": base_weights_unchanged(init, os.path.join(workdir, "run")),
    }
    with open(os.path.join(workdir, "lora_demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory()  # if $NVLM_JAX_HOST_MALLOC=keep; before the backend starts
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("nvlm_jax").setLevel(logging.INFO)
    s = run(_INIT.value, _WORKDIR.value, _STEPS.value, _RANK.value, _TRAIN.value, _EVAL.value, _TARGETS.value,
            _LR.value)
    print(json.dumps(s, indent=2))


if __name__ == "__main__":
    app.run(main)

"""Benchmark evaluation: batched greedy answers, per-sample predictions, a summary, resumable.

    model = load_model("runs/main")                            # or a converted / HF folder
    task = tasks.get_task("textvqa")
    samples = tasks.load_samples(task, "textvqa_val.jsonl")
    summary = evaluate(task, samples, "eval_out", ModelAnswerer(model, max_new_tokens=16), model_name="tiny")

Files in `out_dir` (per task):
  `<task>_predictions.jsonl`: one record per answered sample, {"id", "prompt", "prediction",
      "answers", "score"} (+ "options"), appended (flushed and fsynced) as each batch finishes;
  `<task>_run.json`: what produced the predictions (checkpoint, data, answer length, prompt
      template); a rerun with different settings is refused instead of mixing results;
  `<task>_summary.json`: {"model", "task", "score", "count", "metric", ...} (`report` reads these).

Resuming: a rerun reads the predictions file, skips every sample whose id is in it and
generates only the rest; a torn last line (a run killed mid-write) is cut off first. The
summary always scores the predictions of exactly the samples asked for, in any order.

Generation (`ModelAnswerer`): the release's chat flow (`NVLMModel.chat`): tiles per image,
ChatML prompt in the model's saved prompt format (`model.prompt_format`: tile budget, tile tags,
thumbnail rule, system message), `<image>` expansion, greedy decoding until
`<|im_end|>`, answer decoded without special tokens and stripped. NVLM-D runs a whole batch
through one `NVLMModel.generate` call (prompts left-padded; each row computes what it would
alone, so answers do not depend on the batch size); the last, short batch is padded with
copies of its last sample so every call has the same batch shape (fewer compilations). Other
archs are answered one sample at a time with `NVLMModel.chat`, which owns their per-row tile
contract.

Checkpoints (`load_model`): anything `nvlm_jax.load_pretrained` reads: converted folders,
Hugging Face NVLM-D folders, a training workdir (its latest checkpoint, or `step`) or one
`checkpoints/<step>` folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nvlm_jax.eval import tasks as tasks_lib
from nvlm_jax.eval.tasks import Sample, Task
from nvlm_jax.pretrained import FROM_FORMAT
from nvlm_jax.processing.prompt import IMAGE_PLACEHOLDER

PREDICTIONS_SUFFIX = "_predictions.jsonl"
SUMMARY_SUFFIX = "_summary.json"
RUN_SUFFIX = "_run.json"

AnswerFn = Callable[[Sequence[str], Sequence[Sequence[Any]]], list[str]]


# ---- loading a model -------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, dtype: str | None = None, mesh=None, step: int | str = "latest",
               quantize: str | None = None):
    """`nvlm_jax.load_pretrained(path, dtype, mesh, step=step, quantize=quantize)` (see the module
    docstring).

    dtype: the params and compute dtype; None = the checkpoint's own (`param_dtype` of its
    config; bfloat16 for a Hugging Face folder)."""
    import nvlm_jax

    return nvlm_jax.load_pretrained(path, dtype=dtype, mesh=mesh, step=step, quantize=quantize)


# ---- answering -------------------------------------------------------------------------------------


def user_text(task: Task, sample: Sample) -> str:
    """The user turn for `sample`: one `<image>\\n` per image, then the task's prompt."""
    text = task.prompt(sample)
    if sample.images and IMAGE_PLACEHOLDER not in text:
        text = (IMAGE_PLACEHOLDER + "\n") * len(sample.images) + text
    return text


@dataclasses.dataclass
class ModelAnswerer:
    """Greedy answers of an `NVLMModel` to a batch of user texts (see module docstring).

    Attributes:
      model: the `NVLMModel`.
      max_new_tokens: answer length limit in tokens.
      system_message: the ChatML system turn; default the model's prompt format's (None: none).
      batch_size: NVLM-D batches are padded to this many rows (0: no padding).
    """

    model: Any
    max_new_tokens: int = 16
    system_message: Any = FROM_FORMAT
    batch_size: int = 0

    def __call__(self, texts: Sequence[str], images: Sequence[Sequence[Any]]) -> list[str]:
        if len(texts) != len(images):
            raise ValueError(f"got {len(texts)} texts but {len(images)} image lists")
        if not texts:
            return []
        if self.model.config.arch != "D":
            return [self.model.chat(list(imgs) or None, text, max_new_tokens=self.max_new_tokens,
                                    system_message=self.system_message)
                    for text, imgs in zip(texts, images, strict=True)]
        return self._batched(texts, images)

    def prompt(self, text: str, images: Sequence[Any]):
        """`(tiles [tiles, H, W, 3] or None, EncodedPrompt)` of one user text and its images, in
        the model's prompt format (what `_batched` generates from)."""
        pixels, num_tiles, grids = self.model.tile_images(list(images) or None)
        return pixels, self.model.encode(text, num_tiles, grids=grids, system_message=self.system_message)

    def _batched(self, texts: Sequence[str], images: Sequence[Sequence[Any]]) -> list[str]:
        from nvlm_jax.processing import get_special_tokens

        model = self.model
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; evaluation needs one")
        special = get_special_tokens(model.tokenizer)
        prompts, pixels = [], []
        for text, imgs in zip(texts, images, strict=True):
            px, prompt = self.prompt(text, imgs)
            prompts.append(prompt.input_ids)
            pixels.append(px)
        real = len(prompts)
        while len(prompts) < self.batch_size:  # a constant batch shape: one compiled program
            prompts.append(prompts[real - 1])
            pixels.append(pixels[real - 1])
        tiles = [p for p in pixels if p is not None]
        tokens = model.generate(
            prompts, np.concatenate(tiles) if tiles else None, self.max_new_tokens,
            stop_token_ids=(special.im_end,), pad_token_id=special.endoftext,
        )
        return [decode_answer(model.tokenizer, row, special.im_end) for row in np.asarray(tokens)[:real]]


def decode_answer(tokenizer, tokens: np.ndarray, stop_id: int) -> str:
    """Text of generated `tokens` up to the first `stop_id`, without special tokens, stripped."""
    from nvlm_jax.generate import cut_at_stop

    tokens, _ = cut_at_stop(tokens, (stop_id,))
    return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True).strip()


# ---- predictions file --------------------------------------------------------------------------------


def output_paths(out_dir: str | os.PathLike, task_name: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {"predictions": out / f"{task_name}{PREDICTIONS_SUFFIX}", "summary": out / f"{task_name}{SUMMARY_SUFFIX}",
            "run": out / f"{task_name}{RUN_SUFFIX}"}


def read_predictions(path: str | os.PathLike, *, repair: bool = True) -> dict[str, dict]:
    """{id: record} of a predictions file (the first record of an id wins).

    Records are written whole with their newline, so a last line without one is what a run
    killed mid-write leaves: it is dropped (with `repair`, cut from the file, so appending
    continues on a clean line). A complete line that is not a record raises ValueError naming
    it: the file is corrupt, not interrupted."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # up to the last newline; b"" when there is none
    records: dict[str, dict] = {}
    for number, raw in enumerate(complete.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: corrupt prediction record ({e})") from e
        if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
            raise ValueError(f"{path}:{number}: not a prediction record (needs 'id' and 'prediction')")
        records.setdefault(str(record["id"]), record)
    if repair and len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return records


def _check_run_info(path: Path, info: Mapping[str, Any], predictions: Mapping[str, dict]) -> None:
    """Writes `info`, or checks it against the one that produced existing predictions."""
    if path.is_file() and predictions:
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path.parent} holds {len(predictions)} predictions made with other settings ({detail}); "
                             "use another --out_dir or --overwrite")
    _write_json(path, dict(info))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _batches(items: Sequence[Sample], size: int) -> Iterable[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


# ---- evaluation ------------------------------------------------------------------------------------


def score_samples(task: Task, samples: Sequence[Sample], predictions: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """Per-sample scores in [0, 1] (KeyError if a sample has no prediction)."""
    return [float(task.score(str(predictions[s.id]["prediction"]), s)) for s in samples]


def summarize(task: Task, samples: Sequence[Sample], predictions: Mapping[str, Mapping[str, Any]],
              model_name: str, **extra: Any) -> dict[str, Any]:
    """The summary of `samples` (all must have predictions): score = scale x mean per-sample score."""
    scores = score_samples(task, samples, predictions)
    mean = float(np.mean(scores)) if scores else 0.0
    return {"model": model_name, "task": task.name, "score": round(task.scale * mean, 4), "count": len(scores),
            "metric": task.metric, "scale": task.scale, "correct": round(float(np.sum(scores)), 4), **extra}


def evaluate(
    task: Task,
    samples: Sequence[Sample],
    out_dir: str | os.PathLike,
    answer: AnswerFn,
    *,
    model_name: str,
    batch_size: int = 8,
    run_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Answers the samples that have no prediction yet, then writes and returns the summary.

    Args:
      task: the task (prompt and metric).
      samples: what to evaluate (ids must be unique).
      out_dir: the output folder (created); see the module docstring for its files.
      answer: `(user texts, image lists) -> answers`, e.g. a `ModelAnswerer`.
      model_name: the "model" field of the summary (the row of the results table).
      batch_size: samples per `answer` call.
      run_info: settings recorded in `<task>_run.json` and checked on resume.
      overwrite: start over (delete this task's predictions and summary first).
      progress: show a tqdm bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name!r}: sample ids are not unique")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, task.name)
    if overwrite:
        for p in paths.values():
            p.unlink(missing_ok=True)
    done = read_predictions(paths["predictions"])
    info = {"task": task.name, **(run_info or {})}
    _check_run_info(paths["run"], info, done)
    pending = [s for s in samples if s.id not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=task.name, unit="sample",
                   dynamic_ncols=True)
    start = time.perf_counter()
    try:
        with open(paths["predictions"], "a", encoding="utf-8") as f:
            for batch in _batches(pending, batch_size):
                texts = [user_text(task, s) for s in batch]
                answers = answer(texts, [s.images for s in batch])
                if len(answers) != len(batch):
                    raise ValueError(f"the answer function returned {len(answers)} answers for {len(batch)} samples")
                for sample, text, prediction in zip(batch, texts, answers, strict=True):
                    record = {"id": sample.id, "prompt": text, "prediction": prediction,
                              "answers": list(sample.answers), "score": task.score(prediction, sample)}
                    if sample.options:
                        record["options"] = list(sample.options)
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    done[sample.id] = record
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(task, samples, done, model_name, generated=len(pending),
                        seconds=round(time.perf_counter() - start, 2), **(run_info or {}))
    _write_json(paths["summary"], summary)
    return summary


def run(
    checkpoint: str | os.PathLike,
    task_name: str,
    data: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "eval_results",
    *,
    model_name: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    limit: int = 0,
    dtype: str | None = None,
    seed: int = 0,
    mesh=None,
    overwrite: bool = False,
    progress: bool = True,
    model=None,
) -> dict[str, Any]:
    """Loads the checkpoint (unless `model` is given) and evaluates one task (the CLI's work).

    max_new_tokens: 0 = the task's default; limit: first N samples (synthetic: how many to draw,
    default `tasks.DEFAULT_SYNTHETIC_COUNT`); seed: the synthetic data seed."""
    task = tasks_lib.get_task(task_name)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if task.needs_data and not data:
        raise ValueError(f"task {task.name!r} needs --data=PATH.jsonl (format: nvlm_jax/eval/tasks.py)")
    model = model if model is not None else load_model(checkpoint, dtype, mesh)
    samples = tasks_lib.load_samples(task, data, limit=limit, tile_size=model.config.vision.image_size, seed=seed)
    max_new = max_new_tokens or task.max_new_tokens
    name = model_name or Path(os.path.abspath(checkpoint)).name
    fmt = model.prompt_format
    info = {"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data) if data else None,
            "max_new_tokens": max_new, "system_message": fmt.system_message, "prompt_format": fmt.to_dict()}
    if task.synthetic is not None:
        info["synthetic_seed"] = seed
    answerer = ModelAnswerer(model, max_new_tokens=max_new, batch_size=batch_size)
    return evaluate(task, samples, out_dir, answerer, model_name=name, batch_size=batch_size, run_info=info,
                    overwrite=overwrite, progress=progress)

"""Evaluation tasks: each benchmark's prompt, metric and data file format; the synthetic tasks.

Data files (JSONL, one sample per line, UTF-8)::

    {"id": "q1", "image": "images/1.jpg", "question": "What is written on the sign?",
     "answers": ["stop", "stop sign", ...]}
    {"id": "q2", "image": "ai2d/7.png", "question": "Which stage comes first?",
     "options": ["egg", "larva", "pupa", "adult"], "answer": "A"}

- ``id`` (str or int, unique in the file): the key of the prediction; resuming skips ids that
  already have one.
- ``image``: a path relative to the JSONL file's folder (absolute paths also work), or a list
  of paths for several images (one `<image>` slot each, in order); absent for text-only samples.
- ``question``: the benchmark question as written in the dataset (the task adds its
  instruction, see below).
- ``answers`` (list of str) or ``answer`` (str): the reference answer(s). VQAv2 / TextVQA keep
  all ten human answers (the metric needs them).
- ``options`` (list of str, multiple-choice tasks): the choices in order; ``answer`` is then the
  correct letter ("A", "B", ...) or the text of the correct option. ``hint`` (str, optional) is
  placed before the options.
- ``category`` (str, optional): OCRBench's question type; its "Handwritten Mathematical
  Expression Recognition" subset is matched ignoring spaces, as the official scorer does.

Prompts. The chat template and system message are those of the release's `model.chat`
(ChatML, system "Answer the questions."; NVLM_REFERENCE §4.1): the Hugging Face release's
scores are the acceptance target, and its card reports them with that template. The user turn
is `<image>\\n` + the task's text, where the task's text is:

- VQAv2, TextVQA, ChartQA, DocVQA, InfoVQA: ``"{question}\\nAnswer the question using a single
  word or phrase."`` Source: Megatron-LM `examples/multimodal/run_text_generation.py`
  (`get_conversation`, NVLM evaluation) for VQAv2/TextVQA/ChartQA, and NVLM's SFT prompt pool
  (`nvlm_prompts.json`, VQA SFT). Assumption: DocVQA/InfoVQA use the same suffix (InternVL's
  evaluation, whose template NVLM-D follows, does; later Megatron versions say "a single word,
  phrase, or number").
- AI2D, MMMU, MathVista, RealWorldQA multiple choice: ``"{question}\\n[Hint: {hint}\\n]A. {o1}\\nB.
  {o2}\\n...Answer with the option's letter from the given choices directly."`` Source: Megatron's
  MMMU "vlmevalkit" prompt style and its RealWorldQA dataset (`evaluation_datasets.py`), i.e.
  VLMEvalKit's multiple-choice prompt, which the paper used for AI2D (§6.4).
- MMMU open questions: ``"{question}\\nAnswer the question directly."`` (same source).
  MathVista / RealWorldQA free-form: the short-answer suffix above (assumption).
- OCRBench: the raw question (Megatron `get_conversation`, OCRBench).
- Synthetic tasks: the raw question, exactly as the synthetic training data asks it.

Metrics (from `nvlm_jax.eval.metrics`): VQA accuracy (VQAv2, TextVQA), ANLS (DocVQA, InfoVQA),
relaxed accuracy (ChartQA; best over the answers), option-letter accuracy (multiple choice),
OCRBench substring match, exact match (normalised) for the synthetic tasks and free-form
answers (numbers compared numerically). MathVista's official scorer extracts answers with
GPT-4; ours matches the letter / the normalised answer directly, so free-form MathVista
scores are a lower bound. Scores are percentages, except OCRBench: correct answers per 1000
questions (its 1000 questions give the paper's count; fewer samples are scaled to 1000).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nvlm_jax.eval import metrics

SHORT_ANSWER = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
OPEN_ANSWER = "Answer the question directly."
LETTERS = "ABCDEFGHIJ"  # `metrics.extract_choice` reads up to 10 options
OCRBENCH_HANDWRITTEN_MATH = "Handwritten Mathematical Expression Recognition"
DEFAULT_SYNTHETIC_COUNT = 100


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluation sample.

    Attributes:
      id: unique key (str).
      question: the dataset's question text.
      answers: reference answers (for multiple choice: the one correct letter).
      images: image paths (absolute) or PIL images; empty for text-only samples.
      options: multiple-choice options in order (empty otherwise).
      hint: optional context shown before the options.
      category: optional question type (OCRBench).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    images: tuple[Any, ...] = ()
    options: tuple[str, ...] = ()
    hint: str = ""
    category: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark: how to phrase the question and how to score the answer.

    Attributes:
      name: registry key, also the column name in the results table (`report.BENCHMARKS`).
      metric: the metric's name, recorded in the summary.
      prompt: sample -> the user text (without the image placeholder).
      score: (prediction, sample) -> a value in [0, 1].
      scale: the summary score is `scale` x the mean (100 for %, 1000 for OCRBench).
      max_new_tokens: default answer length limit.
      multiple_choice: whether every sample needs `options` (else they are optional: tasks that
        mix multiple-choice and free-form questions score each kind by its rule).
      synthetic: the `nvlm_jax.data.synthetic` task it draws from (needs no data file).
    """

    name: str
    metric: str
    prompt: Callable[[Sample], str]
    score: Callable[[str, Sample], float]
    scale: float = 100.0
    max_new_tokens: int = 16
    multiple_choice: bool = False
    synthetic: str | None = None

    @property
    def needs_data(self) -> bool:
        return self.synthetic is None


# ---- prompts -----------------------------------------------------------------------------------


def options_block(sample: Sample) -> str:
    """`Hint: ...` (if any) and the options as "A. text" lines, each ending in a newline."""
    lines = [f"Hint: {sample.hint}"] if sample.hint else []
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(sample.options)]
    return "".join(line + "\n" for line in lines)


def short_answer_prompt(sample: Sample) -> str:
    return f"{sample.question}\n{SHORT_ANSWER}"


def raw_prompt(sample: Sample) -> str:
    return sample.question


def multiple_choice_prompt(sample: Sample) -> str:
    return f"{sample.question}\n{options_block(sample)}{MULTIPLE_CHOICE}"


def _choice_or(open_suffix: str) -> Callable[[Sample], str]:
    def prompt(sample: Sample) -> str:
        if sample.options:
            return multiple_choice_prompt(sample)
        return f"{sample.question}\n{open_suffix}"

    return prompt


# ---- scores ------------------------------------------------------------------------------------


def _vqa(prediction: str, sample: Sample) -> float:
    return metrics.vqa_accuracy(prediction, sample.answers)


def _anls(prediction: str, sample: Sample) -> float:
    return metrics.anls(prediction, sample.answers)


def _relaxed(prediction: str, sample: Sample) -> float:
    return max(metrics.relaxed_accuracy(prediction, answer) for answer in sample.answers)


def _exact(prediction: str, sample: Sample) -> float:
    return metrics.exact_match(prediction, sample.answers)


def _open(prediction: str, sample: Sample) -> float:
    """Normalised exact match, or numerically equal numbers ("3.0" == "3")."""
    numeric = max(metrics.relaxed_accuracy(prediction, answer, tolerance=0.0) for answer in sample.answers)
    return max(numeric, metrics.exact_match(prediction, sample.answers))


def _choice(prediction: str, sample: Sample) -> float:
    return metrics.multiple_choice_accuracy(prediction, sample.options, sample.answers[0])


def _choice_or_open(prediction: str, sample: Sample) -> float:
    return _choice(prediction, sample) if sample.options else _open(prediction, sample)


def _ocrbench(prediction: str, sample: Sample) -> float:
    return metrics.substring_match(prediction, sample.answers,
                                   ignore_spaces=sample.category == OCRBENCH_HANDWRITTEN_MATH)


# ---- the registry ------------------------------------------------------------------------------


def _benchmarks() -> dict[str, Task]:
    tasks = [
        Task("vqav2", "vqa_accuracy", short_answer_prompt, _vqa),
        Task("textvqa", "vqa_accuracy", short_answer_prompt, _vqa),
        Task("chartqa", "relaxed_accuracy", short_answer_prompt, _relaxed),
        Task("docvqa", "anls", short_answer_prompt, _anls, max_new_tokens=64),
        Task("infovqa", "anls", short_answer_prompt, _anls, max_new_tokens=64),
        Task("ai2d", "multiple_choice_accuracy", multiple_choice_prompt, _choice, multiple_choice=True),
        Task("mmmu", "multiple_choice_accuracy|open_match", _choice_or(OPEN_ANSWER), _choice_or_open),
        Task("mathvista", "multiple_choice_accuracy|open_match", _choice_or(SHORT_ANSWER), _choice_or_open),
        Task("realworldqa", "multiple_choice_accuracy|open_match", _choice_or(SHORT_ANSWER), _choice_or_open),
        Task("ocrbench", "substring_match", raw_prompt, _ocrbench, scale=1000.0, max_new_tokens=64),
    ]
    return {t.name: t for t in tasks}


def _synthetic_tasks() -> dict[str, Task]:
    from nvlm_jax.data import synthetic

    return {
        f"synthetic_{name}": Task(f"synthetic_{name}", "exact_match", raw_prompt, _exact, max_new_tokens=24,
                                  synthetic=name)
        for name in synthetic.TASKS
    }


TASKS: dict[str, Task] = {**_benchmarks(), **_synthetic_tasks()}


def get_task(name: str) -> Task:
    """The registered task `name` (ValueError listing the known ones otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---- loading samples ---------------------------------------------------------------------------


def _as_answers(record: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if "answers" in record:
        answers = record["answers"]
        if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    elif "answer" in record:
        answers = [record["answer"]]
    else:
        raise ValueError(f"{where}: needs 'answers' (list) or 'answer'")
    return tuple(str(a) for a in answers)


def _answer_letter(answer: str, options: Sequence[str], where: str) -> str:
    letters = LETTERS[: len(options)]
    text = answer.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    matches = [letters[i] for i, option in enumerate(options) if option.strip() == text]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"{where}: answer {answer!r} is neither an option letter ({', '.join(letters)}) "
                     "nor the text of exactly one option")


def parse_sample(record: Any, task: Task, folder: Path, where: str) -> Sample:
    """A `Sample` from one JSONL record (see the module docstring); `where` names it in errors."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("id", "question"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r}")
    if not isinstance(record["question"], str):
        raise ValueError(f"{where}: 'question' must be a string")
    answers = _as_answers(record, where)
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {record.get('image')!r}")
    paths = tuple(str(folder / p) if not os.path.isabs(p) else p for p in images)
    options = record.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str | int | float) for o in options):
        raise ValueError(f"{where}: 'options' must be a list of strings, got {options!r}")
    options = tuple(str(o) for o in options)
    if task.multiple_choice and not options:
        raise ValueError(f"{where}: task {task.name!r} is multiple choice but the sample has no 'options'")
    if len(options) > len(LETTERS):
        raise ValueError(f"{where}: {len(options)} options; at most {len(LETTERS)} are supported")
    if options:
        if len(answers) != 1:
            raise ValueError(f"{where}: a multiple-choice sample needs exactly one answer, got {list(answers)}")
        answers = (_answer_letter(answers[0], options, where),)
    return Sample(id=str(record["id"]), question=record["question"], answers=answers, images=paths,
                  options=options, hint=str(record.get("hint") or ""), category=str(record.get("category") or ""))


def load_jsonl(path: str | os.PathLike, task: Task, limit: int = 0) -> list[Sample]:
    """The samples of a data file, in file order; the first `limit` only when `limit` > 0.

    Raises ValueError naming the file and line of a malformed record or a repeated id, and
    FileNotFoundError for a missing image (checked for the samples kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval data file {path} does not exist")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            sample = parse_sample(record, task, path.parent, where)
            if sample.id in seen:
                raise ValueError(f"{where}: id {sample.id!r} already used on line {seen[sample.id]}")
            seen[sample.id] = number
            samples.append(sample)
            if limit and len(samples) >= limit:
                break
    for sample in samples:
        for image in sample.images:
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{path}: sample {sample.id!r}: image {image} does not exist")
    return samples


def synthetic_samples(task: Task, count: int, *, tile_size: int, seed: int = 0, split: str = "eval") -> list[Sample]:
    """`count` held-out examples of a synthetic task (the same ones for the same seed/split/tile size)."""
    from nvlm_jax.data import synthetic

    if task.synthetic is None:
        raise ValueError(f"task {task.name!r} is not a synthetic task")
    examples = synthetic.heldout_examples(task.synthetic, count, seed=seed, split=split, tile_size=tile_size)
    first = synthetic.split_indices(split, 1)[0]
    return [
        Sample(id=f"{split}/{ex.index - first}", question=ex.question, answers=(ex.answer,),
               images=() if ex.image is None else (ex.image,))
        for ex in examples
    ]


def load_samples(
    task: Task,
    data: str | os.PathLike | None = None,
    *,
    limit: int = 0,
    tile_size: int = 448,
    seed: int = 0,
) -> list[Sample]:
    """The samples to evaluate: from the `data` JSONL, or drawn from the synthetic task
    (`limit` of them, default `DEFAULT_SYNTHETIC_COUNT`; images sized for `tile_size`)."""
    if task.synthetic is not None:
        if data:
            raise ValueError(f"task {task.name!r} is synthetic and takes no data file (got {data})")
        return synthetic_samples(task, limit or DEFAULT_SYNTHETIC_COUNT, tile_size=tile_size, seed=seed)
    if not data:
        raise ValueError(f"task {task.name!r} needs a data file (--data=PATH.jsonl; format in nvlm_jax/eval/tasks.py)")
    return load_jsonl(data, task, limit)

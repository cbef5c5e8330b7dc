"""Built-in synthetic tasks: deterministic (seed, index) -> (image, question, exact short answer).

They let the project train and evaluate with no download. Every example is a pure function of
`(task, seed, index, image spec)`: `np.random.default_rng([seed, task_id, index])` drives all
choices, and Pillow draws the image, so a worker on any machine renders the same pixels.

Tasks (`TASKS`):

* ``"colour"`` — one big shape; "What colour is the shape?" -> one of `COLOURS` (6).
* ``"shape"`` — one big shape; "What shape is this?" -> one of `SHAPES` (4).
* ``"count"`` — 1..6 shapes in distinct grid cells; "How many shapes are there?" -> "3".
* ``"ocr"`` — text or a number rendered with Pillow's default font (`ImageFont.load_default`)
  on a canvas of varied size and aspect ratio (wide canvases force multi-tile images);
  "What is written in the image?" -> the text.
* ``"chart"`` — a bar chart of 3..5 coloured bars with integer values 1..9 on a unit grid;
  asks for the colour of the tallest bar, the value of one bar, or the number of bars.
* ``"arithmetic"`` (text only) — "What is 37 + 45?" -> "82" (+, -, x; results >= 0).
* ``"word_reversal"`` (text only) — "Reverse the order of the words: red blue cat" ->
  "cat blue red".

The colour and shape tasks are made to be learnable by a tiny model on 28-px tiles: few
classes, saturated colours, a shape covering 55-85% of the image, one-word answers.

Splits are disjoint index ranges (`split_indices`): "train" is `[0, size)`, "eval" (alias
"validation") starts at `2**40` and "test" at `2**41`, so no held-out index is ever drawn for
training, however long training runs.

Image sizes are a parameter (`ImageSpec`): the long side is drawn from `[min_size, max_size]`
and the aspect ratio (width / height) from `aspect_ratios`. `default_image_spec(task,
tile_size)` gives sizes relative to the model's tile size (28 px in the tiny config: colour and
shape images are one 28-px tile; OCR canvases up to 4 tiles wide).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 28),
    "green": (26, 150, 65),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 30),
    "purple": (130, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
IMAGE_TASKS: tuple[str, ...] = ("colour", "shape", "count", "ocr", "chart")
TEXT_TASKS: tuple[str, ...] = ("arithmetic", "word_reversal")
TASKS: tuple[str, ...] = IMAGE_TASKS + TEXT_TASKS

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "eval": 1 << 40, "test": 1 << 41}
_SPLIT_ALIASES = {"validation": "eval", "val": "eval"}

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "count": "How many shapes are there?",
    "ocr": "What is written in the image?",
}

_OCR_WORDS = (
    "red green blue yellow cat dog sun tree box page text chart table one two three four five "
    "six seven eight nine ten left right top bottom image shape circle square"
).split()
_REVERSAL_WORDS = _OCR_WORDS
_BACKGROUND = 245


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Size of synthetic images.

    Attributes:
      min_size, max_size: range of the long side in pixels (inclusive).
      aspect_ratios: width / height values to choose from (> 1 is landscape).
    """

    min_size: int = 28
    max_size: int = 112
    aspect_ratios: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"ImageSpec needs 8 <= min_size <= max_size, got {self.min_size}..{self.max_size}")
        if not self.aspect_ratios or any(a <= 0 for a in self.aspect_ratios):
            raise ValueError(f"ImageSpec aspect_ratios must be positive, got {self.aspect_ratios}")


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticExample:
    """One synthetic example.

    Attributes:
      task: a name from `TASKS`.
      index: absolute index (the split offset included).
      question: the user's text (without the image placeholder).
      answer: the exact expected answer.
      image: an RGB PIL image, or None for text-only tasks.
    """

    task: str
    index: int
    question: str
    answer: str
    image: Image.Image | None

    def conversation(self) -> list[dict[str, str]]:
        """LLaVA-style turns; an image task's question starts with `<image>\\n`."""
        question = ("<image>\n" if self.image is not None else "") + self.question
        return [{"from": "human", "value": question}, {"from": "gpt", "value": self.answer}]


def default_image_spec(task: str, tile_size: int = 28) -> ImageSpec:
    """Task image sizes relative to the model's tile size (see module docstring)."""
    _check_task(task)
    t = tile_size
    specs = {
        "colour": ImageSpec(t, t, (1.0,)),
        "shape": ImageSpec(t, t, (1.0,)),
        "count": ImageSpec(2 * t, 2 * t, (1.0,)),
        "ocr": ImageSpec(3 * t, 4 * t, (1.0, 2.0, 3.0, 4.0)),
        "chart": ImageSpec(2 * t, 2 * t, (1.0, 1.5)),
    }
    return specs.get(task, ImageSpec(t, t))


def split_indices(split: str, size: int) -> range:
    """Absolute example indices of a split: "train" `[0, size)`, "eval"/"test" disjoint ranges."""
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLIT_OFFSETS:
        raise ValueError(f"unknown synthetic split {split!r}; use one of {sorted(SPLIT_OFFSETS)} or 'validation'")
    if size < 1 or size > (1 << 40):
        raise ValueError(f"synthetic split size must be in [1, 2**40], got {size}")
    offset = SPLIT_OFFSETS[name]
    return range(offset, offset + size)


def make_example(
    task: str, index: int, *, seed: int = 0, image_spec: ImageSpec | None = None, tile_size: int = 28
) -> SyntheticExample:
    """The example at absolute `index` of `task` (deterministic).

    Args:
      task: a name from `TASKS`.
      index: absolute index (use `split_indices` to stay inside a split).
      seed: dataset seed; different seeds give different datasets.
      image_spec: image sizes; default `default_image_spec(task, tile_size)`.
      tile_size: the model's tile size, used only for the default image spec.
    """
    _check_task(task)
    rng = np.random.default_rng([seed, _task_id(task), index])
    if task in TEXT_TASKS:
        question, answer = _TEXT_MAKERS[task](rng)
        return SyntheticExample(task, index, question, answer, None)
    spec = image_spec or default_image_spec(task, tile_size)
    width, height = _canvas_size(rng, spec)
    image, question, answer = _IMAGE_MAKERS[task](rng, width, height)
    return SyntheticExample(task, index, question, answer, image)


def heldout_examples(
    task: str,
    count: int,
    *,
    seed: int = 0,
    split: str = "eval",
    image_spec: ImageSpec | None = None,
    tile_size: int = 28,
) -> list[SyntheticExample]:
    """The first `count` examples of a held-out split (for exact-match evaluation)."""
    return [
        make_example(task, i, seed=seed, image_spec=image_spec, tile_size=tile_size)
        for i in split_indices(split, count)
    ]


class SyntheticDataSource:
    """Random-access source of one task's split; item i is `(label, record)`.

    `record` is `{"conversations": [...], "images": [PIL image]}` (no images for text tasks),
    the same canonical form the other sources parse into. Rendering happens on access.
    """

    def __init__(
        self,
        task: str,
        split: str,
        size: int,
        *,
        seed: int = 0,
        image_spec: ImageSpec | None = None,
        tile_size: int = 28,
    ):
        _check_task(task)
        self.task = task
        self.split = split
        self.indices = split_indices(split, size)
        self.seed = seed
        self.image_spec = image_spec or default_image_spec(task, tile_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[str, dict[str, Any]]:
        index = self.indices[i % len(self.indices)]
        ex = make_example(self.task, index, seed=self.seed, image_spec=self.image_spec)
        images = [ex.image] if ex.image is not None else []
        return f"synthetic:{self.task}/{self.split}#{index}", {"conversations": ex.conversation(), "images": images}

    def __repr__(self) -> str:
        return f"SyntheticDataSource(task={self.task!r}, split={self.split!r}, size={len(self)}, seed={self.seed})"


# ------------------------------------------------------------------------------------------
# Helpers.


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; available: {', '.join(TASKS)}")


def _task_id(task: str) -> int:
    return zlib.crc32(task.encode())


def _canvas_size(rng: np.random.Generator, spec: ImageSpec) -> tuple[int, int]:
    long_side = int(rng.integers(spec.min_size, spec.max_size + 1))
    aspect = float(spec.aspect_ratios[int(rng.integers(len(spec.aspect_ratios)))])
    if aspect >= 1:
        return long_side, max(8, round(long_side / aspect))
    return max(8, round(long_side * aspect)), long_side


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    noise = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + noise, 0, 255))


def _background(rng: np.random.Generator, width: int, height: int, scale: int) -> Image.Image:
    grey = int(rng.integers(_BACKGROUND - 12, 256))
    return Image.new("RGB", (width * scale, height * scale), (grey, grey, grey))


def _supersample(width: int, height: int) -> int:
    """Draw small images at 4x and downsample, so edges are anti-aliased at 28 px."""
    return 4 if max(width, height) <= 256 else 1


def _finish(canvas: Image.Image, width: int, height: int) -> Image.Image:
    if canvas.size == (width, height):
        return canvas
    return canvas.resize((width, height), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[float], fill: tuple[int, int, int]) -> None:
    """Draws `shape` filling the square `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w = x1 - x0
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        inset = 0.08 * w
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        arm = w / 3
        draw.rectangle((x0 + arm, y0, x1 - arm, y1), fill=fill)
        draw.rectangle((x0, y0 + arm, x1, y1 - arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _single_shape(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    scale = _supersample(width, height)
    canvas = _background(rng, width, height, scale)
    side = float(rng.uniform(0.55, 0.85)) * min(width, height) * scale
    x0 = float(rng.uniform(0, width * scale - side))
    y0 = float(rng.uniform(0, height * scale - side))
    _draw_shape(ImageDraw.Draw(canvas), shape, (x0, y0, x0 + side, y0 + side), _jitter(rng, COLOURS[colour]))
    return _finish(canvas, width, height), colour, shape


def _make_colour(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    image, colour, _ = _single_shape(rng, width, height)
    return image, QUESTIONS["colour"], colour


def _make_shape(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    image, _, shape = _single_shape(rng, width, height)
    return image, QUESTIONS["shape"], shape


def _make_count(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    n = int(rng.integers(1, 7))
    cols = rows = 3
    cells = rng.permutation(cols * rows)[:n]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    scale = _supersample(width, height)
    canvas = _background(rng, width, height, scale)
    draw = ImageDraw.Draw(canvas)
    cw, ch = width * scale / cols, height * scale / rows
    for cell in cells:
        c, r = int(cell) % cols, int(cell) // cols
        side = min(cw, ch) * float(rng.uniform(0.6, 0.85))
        x0 = c * cw + float(rng.uniform(0, cw - side))
        y0 = r * ch + float(rng.uniform(0, ch - side))
        colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), _jitter(rng, colour))
    return _finish(canvas, width, height), QUESTIONS["count"], str(n)


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _ocr_text(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return str(int(rng.integers(10, 10 ** int(rng.integers(2, 8)))))
    words = rng.choice(len(_OCR_WORDS), size=int(rng.integers(1, 4)), replace=False)
    return " ".join(_OCR_WORDS[int(i)] for i in words)


def _make_ocr(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    text = _ocr_text(rng)
    grey = int(rng.integers(235, 256))
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    # Fit the text into 90% of the width and 80% of the height at the largest font size.
    ref = 100
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=_font(ref))
    size = max(6, int(ref * min(0.9 * width / max(1, x1 - x0), 0.8 * height / max(1, y1 - y0))))
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = (width - (x1 - x0)) / 2 - x0
    y = (height - (y1 - y0)) / 2 - y0
    ink = int(rng.integers(0, 60))
    draw.text((x, y), text, fill=(ink, ink, ink), font=font)
    return image, QUESTIONS["ocr"], text


def _make_chart(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    k = int(rng.integers(3, 6))
    names = [list(COLOURS)[int(i)] for i in rng.permutation(len(COLOURS))[:k]]
    values = rng.permutation(9)[:k] + 1  # distinct, so the tallest bar is unique
    kind = int(rng.integers(3))
    scale = _supersample(width, height)
    canvas = Image.new("RGB", (width * scale, height * scale), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left, right = 0.08 * width * scale, 0.97 * width * scale
    top, bottom = 0.05 * height * scale, 0.95 * height * scale
    unit = (bottom - top) / 10
    for v in range(1, 10):
        y = bottom - v * unit
        draw.line((left, y, right, y), fill=(215, 215, 215), width=max(1, scale // 2))
    slot = (right - left) / k
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        bx0 = left + i * slot + 0.15 * slot
        draw.rectangle((bx0, bottom - int(value) * unit, bx0 + 0.7 * slot, bottom), fill=COLOURS[name])
    draw.line((left, top, left, bottom, right, bottom), fill=(0, 0, 0), width=max(1, scale))
    image = _finish(canvas, width, height)
    if kind == 0:
        return image, "What colour is the tallest bar?", names[int(np.argmax(values))]
    if kind == 1:
        i = int(rng.integers(k))
        return image, f"What is the value of the {names[i]} bar?", str(int(values[i]))
    return image, "How many bars are there?", str(k)


def _make_arithmetic(rng: np.random.Generator) -> tuple[str, str]:
    op = "+-x"[int(rng.integers(3))]
    if op == "x":
        a, b = (int(v) for v in rng.integers(0, 13, size=2))
        return f"What is {a} x {b}?", str(a * b)
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b)
    return f"What is {a} + {b}?", str(a + b)


def _make_word_reversal(rng: np.random.Generator) -> tuple[str, str]:
    n = int(rng.integers(2, 6))
    words = [_REVERSAL_WORDS[int(i)] for i in rng.integers(0, len(_REVERSAL_WORDS), size=n)]
    return "Reverse the order of the words: " + " ".join(words), " ".join(reversed(words))


_IMAGE_MAKERS = {
    "colour": _make_colour,
    "shape": _make_shape,
    "count": _make_count,
    "ocr": _make_ocr,
    "chart": _make_chart,
}
_TEXT_MAKERS = {"arithmetic": _make_arithmetic, "word_reversal": _make_word_reversal}

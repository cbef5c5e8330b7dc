"""The chat template (the release's `chatml`) as segments, with image slots expanded to tile tags.

Rendering (NVLM_REFERENCE §4.1–4.2): an optional system turn, then per turn
`<|im_start|>{role}\\n{content}<|im_end|>` with no newline after `<|im_end|>` and no BOS, and for
inference a final `<|im_start|>assistant\\n`. Each image slot becomes, for NVLM-D with 1-D tags,
`<Image><tile_1>{pads}…<tile_{n}>{pads}<tile_global_thumbnail>{pads}</Image>` with
`tokens_per_tile` `<|vision_pad|>` per tile (a single-tile image has only the thumbnail tag).
NVLM-X keeps the tags but no pads (its image tokens reach the decoder by cross-attention);
NVLM-H keeps pads only for the thumbnail. Tag styles of the paper's ablation (Table 1):
"none", "1d" (release), "2d_grid" `<tile_x{col}_y{row}>` (1-based), and "2d_bbox"
`<box>(x0,y0),(x1,y1)</box>`, where the box is the tile's rectangle in the resized image in
integer coordinates 0..1000 (`x0 = 1000*col // cols`, `y0 = 1000*row // rows`, `x1`, `y1` the
same for `col+1`, `row+1`). The thumbnail is tagged `<tile_global_thumbnail>` in every style
except "none" (it is the whole image, not a grid cell).

Image slots. In string content the release's placeholder `<image>` marks an image; the number
of placeholders over all user turns must equal the number of images (ValueError otherwise: the
release would silently leave extras as text or drop images). If no placeholder is present and
there is no history, one `<image>\\n` per image is prepended to the question, like the release
(which does it for its single image). To use a literal "<image>" in text, pass content as a
list of parts, where only `IMAGE` objects are slots and every string is plain text:
`["What does the <image> tag do?", IMAGE]`.

Rendering is done in segments (`Text` pieces and `Special` tokens) so that the one prompt
encoder (`prompt.py`) can encode them injection-safely and know, per token, which tile tag or
`<Image>` wrapper it came from; `render` joins them into the prompt string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nvlm_jax.processing import tokenizer as tokenizer_lib
from nvlm_jax.processing.prompt_format import DEFAULT_SYSTEM_MESSAGE, DEFAULT_TOKENS_PER_TILE, TAG_STYLES

IMAGE_PLACEHOLDER = "<image>"
IMAGE_START = "<Image>"
IMAGE_END = "</Image>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"

ARCHS = ("D", "X", "H")


class ImageSlot:
    """Marks an image position in list-form content; use the module constant `IMAGE`."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = ImageSlot()

Content = str | Sequence[str | ImageSlot]


@dataclasses.dataclass(frozen=True)
class ImageTokenFormat:
    """How an image slot is written into the decoder's text.

    Attributes:
      arch: "D" (tags + image tokens for every tile), "X" (tags only), "H" (tags for every tile,
        image tokens for the thumbnail only).
      tag_style: "none", "1d" (release), "2d_grid" or "2d_bbox".
      tokens_per_tile: `<|vision_pad|>` tokens per tile (256 for 448px tiles, patch 14, 2×2
        pixel shuffle).
      use_thumbnail: whether a multi-tile image's last tile is the thumbnail (as tiled with
        `use_thumbnail=True`).
    """

    arch: str = "D"
    tag_style: str = "1d"
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE
    use_thumbnail: bool = True

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.tag_style not in TAG_STYLES:
            raise ValueError(f"tag_style must be one of {TAG_STYLES}, got {self.tag_style!r}")
        if self.tokens_per_tile < 1:
            raise ValueError(f"tokens_per_tile must be >= 1, got {self.tokens_per_tile}")


# ------------------------------------------------------------------------------------------
# Segments: the rendered prompt as text pieces and special tokens, before tokenization.


@dataclasses.dataclass(frozen=True)
class Text:
    """A piece of plain text (encoded with special-token matching off)."""

    text: str
    answer: bool = False  # part of an assistant answer (trained on)
    tile: int = -1  # global tile index when this text is a tile tag
    image: int = -1  # image index when this text is that image's `<Image>` wrapper


@dataclasses.dataclass(frozen=True)
class Special:
    """`count` copies of a special token (`name`: a field of `tokenizer.SpecialTokens`)."""

    name: str
    count: int = 1
    answer: bool = False
    tile: int = -1  # global tile index of image context tokens


Segment = Text | Special


def render(segments: Sequence[Segment]) -> str:
    """The prompt string of `segments` (special tokens written out)."""
    parts = []
    for seg in segments:
        if isinstance(seg, Text):
            parts.append(seg.text)
        else:
            parts.append(tokenizer_lib.SPECIAL_TOKEN_STRINGS[seg.name] * seg.count)
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# Image expansion.


def as_tile_counts(num_tiles: int | Sequence[int]) -> tuple[int, ...]:
    """`num_tiles` (one int or one per image) as a tuple of positive ints."""
    counts = (num_tiles,) if isinstance(num_tiles, (int, np.integer)) else tuple(num_tiles)
    for i, n in enumerate(counts):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_tiles[{i}] must be a positive int, got {n!r}")
    return tuple(int(n) for n in counts)


def _as_grids(
    grids: Sequence[tuple[int, int]] | None, num_images: int
) -> tuple[tuple[int, int] | None, ...]:
    if grids is None:
        return (None,) * num_images
    grids = tuple(tuple(g) for g in grids)
    if len(grids) != num_images:
        raise ValueError(f"got {len(grids)} grids for {num_images} images")
    return grids


def _num_regular(num_tiles: int, use_thumbnail: bool) -> int:
    """Regular (grid) tiles of an image; a single tile counts as the thumbnail (release)."""
    if num_tiles == 1:
        return 0
    return num_tiles - 1 if use_thumbnail else num_tiles


def tile_tags(
    num_tiles: int,
    grid: tuple[int, int] | None = None,
    *,
    tag_style: str = "1d",
    use_thumbnail: bool = True,
) -> tuple[str, ...]:
    """The text tag of each tile of one image, in pixel order (regular tiles, then thumbnail).

    Args:
      num_tiles: tiles of the image, thumbnail included.
      grid: `(cols, rows)` of the regular tiles; required by the 2-D styles, checked if given.
      tag_style: "none" (all tags empty), "1d", "2d_grid" or "2d_bbox" (see module docstring).
      use_thumbnail: whether the last of several tiles is the thumbnail.
    """
    ImageTokenFormat(tag_style=tag_style)  # validates tag_style
    if num_tiles < 1:
        raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
    regular = _num_regular(num_tiles, use_thumbnail)
    if grid is not None:
        cols, rows = grid
        expected = regular if regular else 1
        if cols < 1 or rows < 1 or cols * rows != expected:
            raise ValueError(
                f"grid {grid} has {cols * rows} tiles but num_tiles={num_tiles} "
                f"(use_thumbnail={use_thumbnail}) means {expected} grid tiles"
            )
    elif tag_style in ("2d_grid", "2d_bbox") and regular:
        raise ValueError(f"tag_style {tag_style!r} needs the (cols, rows) grid of every image")
    if tag_style == "none":
        return ("",) * num_tiles
    tags = []
    for k in range(regular):
        if tag_style == "1d":
            tags.append(f"<tile_{k + 1}>")
            continue
        cols, rows = grid
        col, row = k % cols, k // cols
        if tag_style == "2d_grid":
            tags.append(f"<tile_x{col + 1}_y{row + 1}>")
        else:
            x0, x1 = 1000 * col // cols, 1000 * (col + 1) // cols
            y0, y1 = 1000 * row // rows, 1000 * (row + 1) // rows
            tags.append(f"<box>({x0},{y0}),({x1},{y1})</box>")
    tags.extend([THUMBNAIL_TAG] * (num_tiles - regular))
    return tuple(tags)


def _image_segments(
    num_tiles: int, grid: tuple[int, int] | None, image: int, first_tile: int, fmt: ImageTokenFormat
) -> list[Segment]:
    tags = tile_tags(num_tiles, grid, tag_style=fmt.tag_style, use_thumbnail=fmt.use_thumbnail)
    regular = _num_regular(num_tiles, fmt.use_thumbnail)
    segments: list[Segment] = [Text(IMAGE_START, image=image)]
    for k, tag in enumerate(tags):
        tile = first_tile + k
        if tag:
            segments.append(Text(tag, tile=tile))
        if fmt.arch == "D" or (fmt.arch == "H" and k >= regular):
            segments.append(Special("vision_pad", fmt.tokens_per_tile, tile=tile))
    segments.append(Text(IMAGE_END))
    return segments


def image_token_count(
    num_tiles: int | Sequence[int],
    *,
    arch: str = "D",
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
    use_thumbnail: bool = True,
) -> int:
    """Number of `<|vision_pad|>` tokens the decoder text holds for these images."""
    fmt = ImageTokenFormat(arch=arch, tokens_per_tile=tokens_per_tile, use_thumbnail=use_thumbnail)
    total = 0
    for n in as_tile_counts(num_tiles):
        if fmt.arch == "D":
            total += n
        elif fmt.arch == "H":
            total += n - _num_regular(n, fmt.use_thumbnail)
    return total * fmt.tokens_per_tile


class _Images:
    """Hands out image expansions in order as slots are met."""

    def __init__(self, num_tiles, grids, fmt: ImageTokenFormat):
        self.num_tiles = as_tile_counts(num_tiles)
        self.grids = _as_grids(grids, len(self.num_tiles))
        self.fmt = fmt
        self.used = 0
        self.first_tile = 0

    def check_slot_count(self, slots: int) -> None:
        if slots != len(self.num_tiles):
            raise ValueError(
                f"the prompt has {slots} image slot(s) but {len(self.num_tiles)} image(s) "
                "were given"
            )

    def next_segments(self) -> list[Segment]:
        i = self.used
        try:
            segments = _image_segments(self.num_tiles[i], self.grids[i], i, self.first_tile, self.fmt)
        except ValueError as e:
            raise ValueError(f"image {i}: {e}") from e
        self.used += 1
        self.first_tile += self.num_tiles[i]
        return segments


def _count_slots(content: Content) -> int:
    if isinstance(content, str):
        return content.count(IMAGE_PLACEHOLDER)
    return sum(isinstance(part, ImageSlot) for part in content)


def _check_content(content: Any, where: str) -> Content:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and all(isinstance(p, (str, ImageSlot)) for p in content):
        return content
    raise ValueError(f"{where}: content must be a str or a list of str / IMAGE, got {content!r}")


def _prepend_images(content: Content, num_images: int) -> Content:
    if isinstance(content, str):
        return (IMAGE_PLACEHOLDER + "\n") * num_images + content
    return [IMAGE, "\n"] * num_images + list(content)


def _content_segments(content: Content, images: _Images) -> list[Segment]:
    """User content: text, with each slot replaced by its image expansion."""
    parts: Sequence[str | ImageSlot]
    if isinstance(content, str):
        pieces = content.split(IMAGE_PLACEHOLDER)
        parts = [p for i, text in enumerate(pieces) for p in ((IMAGE, text) if i else (text,))]
    else:
        parts = content
    segments: list[Segment] = []
    for part in parts:
        if isinstance(part, ImageSlot):
            segments.extend(images.next_segments())
        elif part:
            segments.append(Text(part))
    return segments


# ------------------------------------------------------------------------------------------
# Conversations.

_ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}


def _turns_from_conversation(
    conversation: Sequence[Mapping[str, Any]],
) -> tuple[str | None, bool, list[tuple[str, Content]]]:
    """Normalises {"role", "content"} or LLaVA {"from", "value"} turns.

    Returns:
      (system message from a leading system turn, whether there was one, [(role, content)]).
    """
    turns: list[tuple[str, Content]] = []
    system: str | None = None
    has_system = False
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i}: expected a dict, got {type(turn).__name__}")
        raw_role = turn.get("role", turn.get("from"))
        role = _ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ValueError(f"turn {i}: unknown role {raw_role!r} (use user/assistant/system)")
        content = _check_content(turn.get("content", turn.get("value")), f"turn {i}")
        if role == "system":
            if i != 0 or not isinstance(content, str):
                raise ValueError(f"turn {i}: a system turn must come first and be a str")
            system, has_system = content, True
            continue
        if role == "assistant" and _count_slots(content) and not isinstance(content, str):
            raise ValueError(f"turn {i}: assistant turns cannot hold images")
        turns.append((role, content))
    return system, has_system, turns


def _conversation_segments(
    system_message: str | None,
    turns: Sequence[tuple[str, Content]],
    images: _Images,
    *,
    train: bool,
    generation_prompt: bool,
) -> list[Segment]:
    images.check_slot_count(sum(_count_slots(c) for role, c in turns if role == "user"))
    segments: list[Segment] = []
    if system_message is not None:
        segments += [Special("im_start"), Text("system\n" + system_message), Special("im_end")]
    for role, content in turns:
        segments += [Special("im_start"), Text(role + "\n")]
        if role == "user":
            segments += _content_segments(content, images)
            segments.append(Special("im_end"))
        else:
            # Assistant text is never scanned for image slots: "<image>" there is text.
            text = content if isinstance(content, str) else "".join(content)
            if text:
                segments.append(Text(text, answer=train))
            segments.append(Special("im_end", answer=train))
    if generation_prompt:
        segments += [Special("im_start"), Text("assistant\n")]
    return segments


def _chat_turns(
    question: Content, history: Sequence[tuple[Content, str]] | None, num_images: int
) -> list[tuple[str, Content]]:
    question = _check_content(question, "question")
    turns: list[tuple[str, Content]] = []
    for i, pair in enumerate(history or ()):
        if len(pair) != 2:
            raise ValueError(f"history[{i}] must be a (question, answer) pair")
        turns += [
            ("user", _check_content(pair[0], f"history[{i}]")),
            ("assistant", _check_content(pair[1], f"history[{i}]")),
        ]
    slots = sum(_count_slots(c) for role, c in turns if role == "user") + _count_slots(question)
    if slots == 0 and num_images and history is None:
        question = _prepend_images(question, num_images)
    turns.append(("user", question))
    return turns


def chat_segments(
    question: Content,
    num_tiles: int | Sequence[int],
    history: Sequence[tuple[Content, str]] | None,
    system_message: str | None,
    grids: Sequence[tuple[int, int]] | None,
    fmt: ImageTokenFormat,
) -> list[Segment]:
    """Segments of a chat prompt ending in the assistant header (see `build_prompt`)."""
    images = _Images(num_tiles, grids, fmt)
    turns = _chat_turns(question, history, len(images.num_tiles))
    return _conversation_segments(
        system_message, turns, images, train=False, generation_prompt=True
    )


def training_segments(
    conversation: Sequence[Mapping[str, Any]],
    num_tiles: int | Sequence[int],
    system_message: str | None,
    grids: Sequence[tuple[int, int]] | None,
    fmt: ImageTokenFormat,
) -> list[Segment]:
    """Segments of a whole conversation with its answers marked (see `build_training_example`)."""
    system, has_system, turns = _turns_from_conversation(conversation)
    if has_system:
        system_message = system
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("conversation has no assistant turn to train on")
    images = _Images(num_tiles, grids, fmt)
    if images.num_tiles and not any(_count_slots(c) for role, c in turns if role == "user"):
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise ValueError("conversation has images but no user turn to put them in")
        turns[first_user] = ("user", _prepend_images(turns[first_user][1], len(images.num_tiles)))
    return _conversation_segments(system_message, turns, images, train=True, generation_prompt=False)


# ------------------------------------------------------------------------------------------
# Public: strings.


def expand_image_placeholders(
    text: str,
    num_tiles: int | Sequence[int],
    *,
    arch: str = "D",
    tag_style: str = "1d",
    grids: Sequence[tuple[int, int]] | None = None,
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
    use_thumbnail: bool = True,
) -> str:
    """Replaces each `<image>` in `text`, in order, by its image's tags and image tokens.

    Args:
      text: any text; its number of `<image>` must equal the number of images.
      num_tiles: tiles per image (thumbnail included), e.g. `[7, 1]`.
      grids: `(cols, rows)` per image; needed for the 2-D tag styles.
      arch, tag_style, tokens_per_tile, use_thumbnail: see `ImageTokenFormat`.
    """
    fmt = ImageTokenFormat(arch, tag_style, tokens_per_tile, use_thumbnail)
    images = _Images(num_tiles, grids, fmt)
    images.check_slot_count(_count_slots(text))
    return render(_content_segments(text, images))


def build_prompt(
    question: Content,
    num_tiles: int | Sequence[int] = (),
    history: Sequence[tuple[Content, str]] | None = None,
    *,
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
    arch: str = "D",
    tag_style: str = "1d",
    grids: Sequence[tuple[int, int]] | None = None,
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
    use_thumbnail: bool = True,
) -> str:
    """The release's chat prompt string for `question`, with images expanded.

    Args:
      question: the user's message; `<image>` marks image positions (or list-form content).
      num_tiles: tiles per image in order (thumbnail included); `[]` for text-only.
      history: earlier `(question, answer)` pairs, oldest first.
      system_message: the system turn's text; None for no system turn.
      arch, tag_style, grids, tokens_per_tile, use_thumbnail: image expansion (see
        `expand_image_placeholders`).

    Returns:
      e.g. `<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n<Image>…
      </Image>\\nDescribe.<|im_end|><|im_start|>assistant\\n`. For model input use
      `encode_prompt`, which is injection-safe; this string is not (it is plain text).
    """
    fmt = ImageTokenFormat(arch, tag_style, tokens_per_tile, use_thumbnail)
    return render(chat_segments(question, num_tiles, history, system_message, grids, fmt))



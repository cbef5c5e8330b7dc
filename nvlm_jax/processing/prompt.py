"""Chat prompts (the release's `chatml` template) with image placeholders expanded, and token ids.

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

Token ids and injection safety (`encode_prompt`, `build_training_example`). The template's
special tokens (`<|im_start|>`, `<|im_end|>`, `<|vision_pad|>`) are inserted as ids; all text
(template words, tags, `<Image>` wrappers and user text) is encoded with special-token matching
off (`tokenizer.TextEncoder`). So text typed by a user (`<|im_start|>assistant`, `<|vision_pad|>`,
`<tile_3>`, ...) can never open a turn or create an image slot; `tile_ids` marks only the tags
we inserted. Each maximal run of text between special tokens is encoded as ONE string, which
is exactly how the release tokenizer treats the whole rendered prompt (it splits at special
tokens first, then BPE-merges each piece, e.g. `<Image><tile_1>` → `<Image`, `><`, `tile`, ...).
Hence for benign text the ids equal `tokenizer(build_prompt(...))` (tested with the release
vocabulary).

One deliberate difference, in training examples only: an assistant answer is encoded as its
own run, separate from the `assistant\\n` header before it, so the loss mask lines up with token
boundaries exactly. That is also what the model sees at generation time (the prompt ends with
the header's tokens and the answer is generated after them). It equals whole-string
tokenization unless the answer starts with whitespace that Qwen2's pre-tokenizer would glue to
the header's newline (e.g. an answer starting with "\\n" or " \\n").
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nvlm_jax.processing import tokenizer as tokenizer_lib

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM_MESSAGE = "Answer the questions."
IMAGE_START = "<Image>"
IMAGE_END = "</Image>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"
DEFAULT_TOKENS_PER_TILE = 256
IGNORE_INDEX = -100

ARCHS = ("D", "X", "H")
TAG_STYLES = ("none", "1d", "2d_grid", "2d_bbox")


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


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """Token ids of a rendered conversation, with training targets.

    Attributes:
      input_ids: `[seq]` int32.
      labels: `[seq]` int32, `input_ids` where `loss_mask` else `IGNORE_INDEX` (-100). Unshifted:
        the loss at position t compares `labels[t]` with the logits at position t-1.
      loss_mask: `[seq]` bool, True exactly on assistant answer tokens and their `<|im_end|>`.
      tile_ids: `[seq]` int32, for image tokens and tile-tag tokens the index of their tile among
        all tiles of all images (pixel order: each image's regular tiles, then its thumbnail),
        -1 elsewhere. A tag token merged across a boundary (`><`) belongs to the tag holding its
        first character, else the one holding its last character.
      num_tiles: tiles per image.
      text: the rendered prompt string (special tokens written out).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    tile_ids: np.ndarray
    num_tiles: tuple[int, ...]
    text: str


# ------------------------------------------------------------------------------------------
# Segments: the rendered prompt as text pieces and special tokens, before tokenization.


@dataclasses.dataclass(frozen=True)
class _Text:
    text: str
    answer: bool = False  # part of an assistant answer (trained on)
    tile: int = -1  # global tile index when this text is a tile tag


@dataclasses.dataclass(frozen=True)
class _Special:
    name: str  # a field of tokenizer.SpecialTokens
    count: int = 1
    answer: bool = False
    tile: int = -1


_Segment = _Text | _Special


def _render(segments: Sequence[_Segment]) -> str:
    parts = []
    for seg in segments:
        if isinstance(seg, _Text):
            parts.append(seg.text)
        else:
            parts.append(tokenizer_lib.SPECIAL_TOKEN_STRINGS[seg.name] * seg.count)
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# Image expansion.


def _as_tile_counts(num_tiles: int | Sequence[int]) -> tuple[int, ...]:
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
    num_tiles: int, grid: tuple[int, int] | None, first_tile: int, fmt: ImageTokenFormat
) -> list[_Segment]:
    tags = tile_tags(num_tiles, grid, tag_style=fmt.tag_style, use_thumbnail=fmt.use_thumbnail)
    regular = _num_regular(num_tiles, fmt.use_thumbnail)
    segments: list[_Segment] = [_Text(IMAGE_START)]
    for k, tag in enumerate(tags):
        tile = first_tile + k
        if tag:
            segments.append(_Text(tag, tile=tile))
        if fmt.arch == "D" or (fmt.arch == "H" and k >= regular):
            segments.append(_Special("vision_pad", fmt.tokens_per_tile, tile=tile))
    segments.append(_Text(IMAGE_END))
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
    for n in _as_tile_counts(num_tiles):
        if fmt.arch == "D":
            total += n
        elif fmt.arch == "H":
            total += n - _num_regular(n, fmt.use_thumbnail)
    return total * fmt.tokens_per_tile


class _Images:
    """Hands out image expansions in order as slots are met."""

    def __init__(self, num_tiles, grids, fmt: ImageTokenFormat):
        self.num_tiles = _as_tile_counts(num_tiles)
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

    def next_segments(self) -> list[_Segment]:
        i = self.used
        try:
            segments = _image_segments(self.num_tiles[i], self.grids[i], self.first_tile, self.fmt)
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


def _content_segments(content: Content, images: _Images) -> list[_Segment]:
    """User content: text, with each slot replaced by its image expansion."""
    parts: Sequence[str | ImageSlot]
    if isinstance(content, str):
        pieces = content.split(IMAGE_PLACEHOLDER)
        parts = [p for i, text in enumerate(pieces) for p in ((IMAGE, text) if i else (text,))]
    else:
        parts = content
    segments: list[_Segment] = []
    for part in parts:
        if isinstance(part, ImageSlot):
            segments.extend(images.next_segments())
        elif part:
            segments.append(_Text(part))
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
) -> list[_Segment]:
    images.check_slot_count(sum(_count_slots(c) for role, c in turns if role == "user"))
    segments: list[_Segment] = []
    if system_message is not None:
        segments += [_Special("im_start"), _Text("system\n" + system_message), _Special("im_end")]
    for role, content in turns:
        segments += [_Special("im_start"), _Text(role + "\n")]
        if role == "user":
            segments += _content_segments(content, images)
            segments.append(_Special("im_end"))
        else:
            # Assistant text is never scanned for image slots: "<image>" there is text.
            text = content if isinstance(content, str) else "".join(content)
            if text:
                segments.append(_Text(text, answer=train))
            segments.append(_Special("im_end", answer=train))
    if generation_prompt:
        segments += [_Special("im_start"), _Text("assistant\n")]
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


def _chat_segments(
    question: Content,
    num_tiles: int | Sequence[int],
    history: Sequence[tuple[Content, str]] | None,
    system_message: str | None,
    grids: Sequence[tuple[int, int]] | None,
    fmt: ImageTokenFormat,
) -> list[_Segment]:
    images = _Images(num_tiles, grids, fmt)
    turns = _chat_turns(question, history, len(images.num_tiles))
    return _conversation_segments(
        system_message, turns, images, train=False, generation_prompt=True
    )


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
    return _render(_content_segments(text, images))


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
    return _render(_chat_segments(question, num_tiles, history, system_message, grids, fmt))


# ------------------------------------------------------------------------------------------
# Public: token ids.


def _tile_of_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int, int]]
) -> list[int]:
    """Tile index per token from tagged character spans `(start, end, tile)` (sorted)."""
    starts = [s for s, _, _ in spans]

    def tile_at(pos: int) -> int:
        i = bisect.bisect_right(starts, pos) - 1
        if i >= 0 and pos < spans[i][1]:
            return spans[i][2]
        return -1

    tiles = []
    for start, end in offsets:
        tile = tile_at(start)
        tiles.append(tile if tile >= 0 or end <= start else tile_at(end - 1))
    return tiles


def _encode_segments(
    segments: Sequence[_Segment],
    encoder: tokenizer_lib.TextEncoder,
    expected_image_tokens: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids: list[int] = []
    answer: list[bool] = []
    tiles: list[int] = []
    run: list[_Text] = []

    def flush() -> None:
        if not run:
            return
        text = "".join(seg.text for seg in run)
        run_ids, offsets = encoder.encode_with_offsets(text)
        ids.extend(run_ids)
        answer.extend([run[0].answer] * len(run_ids))
        spans, pos = [], 0
        for seg in run:
            if seg.tile >= 0:
                spans.append((pos, pos + len(seg.text), seg.tile))
            pos += len(seg.text)
        tiles.extend(_tile_of_tokens(offsets, spans) if spans else [-1] * len(run_ids))
        run.clear()

    for seg in segments:
        if isinstance(seg, _Text):
            # An answer never shares a run with prompt text, so masks align with tokens.
            if run and run[0].answer != seg.answer:
                flush()
            run.append(seg)
        else:
            flush()
            token_id = getattr(encoder.special, seg.name)
            ids.extend([token_id] * seg.count)
            answer.extend([seg.answer] * seg.count)
            tiles.extend([seg.tile] * seg.count)
    flush()
    input_ids = np.asarray(ids, np.int32)
    got = int(np.count_nonzero(input_ids == encoder.special.vision_pad))
    if got != expected_image_tokens:
        # Only possible if the tokenizer maps plain text to the pad id: refuse rather than
        # misalign image features.
        raise ValueError(f"prompt has {got} image tokens, expected {expected_image_tokens}")
    return input_ids, np.asarray(answer, bool), np.asarray(tiles, np.int32)


def _encoded(
    segments: Sequence[_Segment],
    tokenizer: Any,
    num_tiles: tuple[int, ...],
    fmt: ImageTokenFormat,
) -> EncodedPrompt:
    encoder = tokenizer_lib.text_encoder(tokenizer)
    expected = image_token_count(
        num_tiles,
        arch=fmt.arch,
        tokens_per_tile=fmt.tokens_per_tile,
        use_thumbnail=fmt.use_thumbnail,
    )
    input_ids, loss_mask, tile_ids = _encode_segments(segments, encoder, expected)
    labels = np.where(loss_mask, input_ids, np.int32(IGNORE_INDEX)).astype(np.int32)
    return EncodedPrompt(
        input_ids=input_ids,
        labels=labels,
        loss_mask=loss_mask,
        tile_ids=tile_ids,
        num_tiles=num_tiles,
        text=_render(segments),
    )


def encode_prompt(
    tokenizer: Any,
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
) -> EncodedPrompt:
    """Injection-safe token ids of `build_prompt(...)` (same arguments), ready for generation.

    `loss_mask` is all False. For benign text, `input_ids` equals tokenizing the
    `build_prompt` string with the release tokenizer.
    """
    fmt = ImageTokenFormat(arch, tag_style, tokens_per_tile, use_thumbnail)
    segments = _chat_segments(question, num_tiles, history, system_message, grids, fmt)
    return _encoded(segments, tokenizer, _as_tile_counts(num_tiles), fmt)


def build_training_example(
    tokenizer: Any,
    conversation: Sequence[Mapping[str, Any]],
    num_tiles: int | Sequence[int] = (),
    *,
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
    arch: str = "D",
    tag_style: str = "1d",
    grids: Sequence[tuple[int, int]] | None = None,
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE,
    use_thumbnail: bool = True,
) -> EncodedPrompt:
    """Token ids, labels and loss mask of one conversation for supervised training.

    Args:
      tokenizer: from `load_tokenizer`.
      conversation: turns as `{"role": "user"|"assistant"|"system", "content": ...}` or LLaVA's
        `{"from": "human"|"gpt"|"system", "value": ...}`. A leading system turn replaces
        `system_message`. Images go in user turns (`<image>` or list-form `IMAGE`); if there is
        no slot at all, one `<image>\\n` per image is prepended to the first user turn.
      num_tiles: tiles per image, in slot order.
      system_message, arch, tag_style, grids, tokens_per_tile, use_thumbnail: as `build_prompt`.

    Returns:
      `EncodedPrompt` whose `loss_mask` covers each assistant answer and its `<|im_end|>`, never
      the system/user text, role headers, image tokens or tags.
    """
    fmt = ImageTokenFormat(arch, tag_style, tokens_per_tile, use_thumbnail)
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
    segments = _conversation_segments(
        system_message, turns, images, train=True, generation_prompt=False
    )
    return _encoded(segments, tokenizer, images.num_tiles, fmt)


def iter_answer_spans(example: EncodedPrompt) -> Iterator[tuple[int, int]]:
    """`(start, end)` token ranges where `loss_mask` is True (one per assistant turn)."""
    mask = example.loss_mask.astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        yield int(start), int(end)


@dataclasses.dataclass(frozen=True)
class CrossAttentionIds:
    """Per-token and per-tile ids the NVLM-X/H cross-attention needs (the batch contract's fields).

    Attributes:
      token_image: `[seq]` int32, the latest image whose `<Image>` block starts at or before the
        token (-1: before every image).
      token_tile: `[seq]` int32, for tile-tag tokens the tile they name (its index among all
        tiles of the prompt, pixel order); -1 elsewhere, image context tokens included.
      tile_image: `[tiles]` int32, the image of each tile.
    """

    token_image: np.ndarray
    token_tile: np.ndarray
    tile_image: np.ndarray


def cross_attention_ids(encoded: EncodedPrompt, tokenizer: Any, *, token_text: Any = None) -> CrossAttentionIds:
    """The X/H ids of an encoded prompt, computed exactly as the training pipeline does.

    `<Image>` blocks are located by `nvlm_jax.data.transforms.image_start_tokens` (imported
    lazily: it lives with the pipeline). Raises ValueError when the blocks cannot be told apart
    from user text (only possible for NVLM-X with tag style "none" and "<Image></Image>" typed
    by the user).

    Args:
      encoded: from `encode_prompt` or `build_training_example` (any arch).
      tokenizer: the tokenizer that encoded it.
      token_text: optional reusable id → text cache (`transforms._TokenText`-like, with `join`).
    """
    from nvlm_jax.data import transforms  # the pipeline imports this module: import at call time

    if token_text is None:
        token_text = transforms._TokenText(tokenizer)
    ids = np.asarray(encoded.input_ids, np.int32)
    starts = transforms.image_start_tokens(ids, encoded.tile_ids, encoded.num_tiles, token_text)
    if starts is None:
        raise ValueError("cannot tell the prompt's <Image> blocks from user text (ambiguous image marker)")
    context_id = tokenizer_lib.text_encoder(tokenizer).special.vision_pad
    token_tile = np.where(ids == context_id, -1, encoded.tile_ids).astype(np.int32)
    token_image = (np.searchsorted(starts, np.arange(ids.size), side="right") - 1).astype(np.int32)
    tile_image = np.repeat(np.arange(len(encoded.num_tiles), dtype=np.int32), encoded.num_tiles)
    return CrossAttentionIds(token_image, token_tile, tile_image)

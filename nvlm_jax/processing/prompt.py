"""The one prompt encoder: a chat prompt or training conversation -> token ids, training
targets, and the per-token image and tile indices that the data pipeline and inference both use.

The text comes from `chat_template` (the release's `chatml`, image slots expanded to tile tags
and image tokens); its public names are re-exported here. While encoding, every token is traced
back to the template segment it came from (via the tokenizer's character offsets), so the
encoder knows which tile tag each token belongs to and which token starts each image's `<Image>`
block. Nothing is re-found afterwards by decoding tokens, so user text holding "<Image>",
"</Image>" or tags can never be mistaken for the real ones.

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

from nvlm_jax.processing import chat_template as template
from nvlm_jax.processing import tokenizer as tokenizer_lib
from nvlm_jax.processing.chat_template import (
    ARCHS,
    IMAGE,
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    THUMBNAIL_TAG,
    Content,
    ImageSlot,
    ImageTokenFormat,
    build_prompt,
    expand_image_placeholders,
    image_token_count,
    tile_tags,
)
from nvlm_jax.processing.prompt_format import DEFAULT_SYSTEM_MESSAGE, DEFAULT_TOKENS_PER_TILE, TAG_STYLES

IGNORE_INDEX = -100

__all__ = [
    "ARCHS",
    "DEFAULT_SYSTEM_MESSAGE",
    "DEFAULT_TOKENS_PER_TILE",
    "IGNORE_INDEX",
    "IMAGE",
    "IMAGE_END",
    "IMAGE_PLACEHOLDER",
    "IMAGE_START",
    "TAG_STYLES",
    "THUMBNAIL_TAG",
    "Content",
    "CrossAttentionIds",
    "EncodedPrompt",
    "ImageSlot",
    "ImageTokenFormat",
    "build_prompt",
    "build_training_example",
    "cross_attention_ids",
    "encode_prompt",
    "expand_image_placeholders",
    "image_token_count",
    "iter_answer_spans",
    "tile_tags",
]


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """Token ids of a rendered conversation, with training targets and per-token image/tile ids.

    Attributes:
      input_ids: `[seq]` int32.
      labels: `[seq]` int32, `input_ids` where `loss_mask` else `IGNORE_INDEX` (-100). Unshifted:
        the loss at position t compares `labels[t]` with the logits at position t-1.
      loss_mask: `[seq]` bool, True exactly on assistant answer tokens and their `<|im_end|>`.
      tile_ids: `[seq]` int32, for image tokens and tile-tag tokens the index of their tile among
        all tiles of all images (pixel order: each image's regular tiles, then its thumbnail),
        -1 elsewhere. A tag token merged across a boundary (`><`) belongs to the tag holding its
        first character, else the one holding its last character.
      token_tile: `[seq]` int32, `tile_ids` on tile-tag tokens only (-1 on image tokens): the
        tile a tag token is restricted to in the NVLM-X/H cross-attention.
      token_image: `[seq]` int32, the latest image whose `<Image>` block starts at or before the
        token (-1 before every image).
      image_starts: `[images]` int32, increasing: the token holding the `<` of each image's
        `<Image>` wrapper (also when that token is merged with text before it, e.g. ` <`).
      num_tiles: tiles per image.
      text: the rendered prompt string (special tokens written out).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    tile_ids: np.ndarray
    token_tile: np.ndarray
    token_image: np.ndarray
    image_starts: np.ndarray
    num_tiles: tuple[int, ...]
    text: str

    @property
    def tile_image(self) -> np.ndarray:
        """`[tiles]` int32, the image of each tile."""
        return np.repeat(np.arange(len(self.num_tiles), dtype=np.int32), self.num_tiles)


# ------------------------------------------------------------------------------------------
# Encoding segments.


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


def _token_holding(offsets: Sequence[tuple[int, int]], pos: int) -> int:
    """Index of the token whose character span holds `pos` (else the first token after it)."""
    i = bisect.bisect_right([s for s, _ in offsets], pos) - 1
    if i >= 0 and pos < offsets[i][1]:
        return i
    return min(i + 1, len(offsets) - 1)


@dataclasses.dataclass
class _Encoding:
    """Per-token lists, filled segment by segment."""

    ids: list[int] = dataclasses.field(default_factory=list)
    answer: list[bool] = dataclasses.field(default_factory=list)
    tile_ids: list[int] = dataclasses.field(default_factory=list)
    token_tile: list[int] = dataclasses.field(default_factory=list)
    image_starts: list[int] = dataclasses.field(default_factory=list)

    def add_text(self, run: Sequence[template.Text], encoder: tokenizer_lib.TextEncoder) -> None:
        """A run of text segments, encoded as ONE string (as the release tokenizes it)."""
        run_ids, offsets = encoder.encode_with_offsets("".join(seg.text for seg in run))
        spans, pos = [], 0
        for seg in run:
            if seg.tile >= 0:
                spans.append((pos, pos + len(seg.text), seg.tile))
            if seg.image >= 0:
                self.image_starts.append(len(self.ids) + _token_holding(offsets, pos))
            pos += len(seg.text)
        tiles = _tile_of_tokens(offsets, spans) if spans else [-1] * len(run_ids)
        self.ids.extend(run_ids)
        self.answer.extend([run[0].answer] * len(run_ids))
        self.tile_ids.extend(tiles)
        self.token_tile.extend(tiles)

    def add_special(self, seg: template.Special, token_id: int) -> None:
        self.ids.extend([token_id] * seg.count)
        self.answer.extend([seg.answer] * seg.count)
        self.tile_ids.extend([seg.tile] * seg.count)
        self.token_tile.extend([-1] * seg.count)


def _encode(
    segments: Sequence[template.Segment], tokenizer: Any, num_tiles: tuple[int, ...], fmt: ImageTokenFormat
) -> EncodedPrompt:
    encoder = tokenizer_lib.text_encoder(tokenizer)
    out = _Encoding()
    run: list[template.Text] = []
    for seg in segments:
        if isinstance(seg, template.Text):
            # An answer never shares a run with prompt text, so masks align with tokens.
            if run and run[0].answer != seg.answer:
                out.add_text(run, encoder)
                run = []
            run.append(seg)
        else:
            if run:
                out.add_text(run, encoder)
                run = []
            out.add_special(seg, getattr(encoder.special, seg.name))
    if run:
        out.add_text(run, encoder)

    input_ids = np.asarray(out.ids, np.int32)
    expected = image_token_count(
        num_tiles, arch=fmt.arch, tokens_per_tile=fmt.tokens_per_tile, use_thumbnail=fmt.use_thumbnail
    )
    got = int(np.count_nonzero(input_ids == encoder.special.vision_pad))
    if got != expected:
        # Only possible if the tokenizer maps plain text to the pad id: refuse rather than
        # misalign image features.
        raise ValueError(f"prompt has {got} image tokens, expected {expected}")
    loss_mask = np.asarray(out.answer, bool)
    image_starts = np.asarray(out.image_starts, np.int32)
    token_image = np.searchsorted(image_starts, np.arange(input_ids.size), side="right") - 1
    return EncodedPrompt(
        input_ids=input_ids,
        labels=np.where(loss_mask, input_ids, np.int32(IGNORE_INDEX)).astype(np.int32),
        loss_mask=loss_mask,
        tile_ids=np.asarray(out.tile_ids, np.int32),
        token_tile=np.asarray(out.token_tile, np.int32),
        token_image=token_image.astype(np.int32),
        image_starts=image_starts,
        num_tiles=num_tiles,
        text=template.render(segments),
    )


# ------------------------------------------------------------------------------------------
# Public.


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
    segments = template.chat_segments(question, num_tiles, history, system_message, grids, fmt)
    return _encode(segments, tokenizer, template.as_tile_counts(num_tiles), fmt)


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
    segments = template.training_segments(conversation, num_tiles, system_message, grids, fmt)
    return _encode(segments, tokenizer, template.as_tile_counts(num_tiles), fmt)


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


def cross_attention_ids(encoded: EncodedPrompt) -> CrossAttentionIds:
    """The X/H ids of an encoded prompt (`encode_prompt` or `build_training_example`, any arch):
    the same per-token fields the training pipeline's `MakeTargets` puts in a batch."""
    return CrossAttentionIds(encoded.token_image, encoded.token_tile, encoded.tile_image)

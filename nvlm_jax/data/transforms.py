"""Per-sample transforms, each a small named `grain.transforms.Map`, and the samples they pass on.

A record goes through, in order (`pipeline.make_dataset` wires them per source):

  parse (`parsing.ParseJsonLine` | `ParseMsgpackRecord` | `ParseTfdsExample` | `ParseRecordDict`)
    -> `RawSample` (conversation + image references)
  `ValidateConversation` -> same `RawSample`, or skipped
  `LoadImages`           -> `RawSample` whose images are decoded RGB PIL images
  `TileImages`           -> `TiledSample` (uint8 tiles `[N, t, t, 3]`, tiles per image, grids)
  `EncodeConversation`   -> `EncodedSample` (`prompt.build_training_example`: ids, loss mask
                            and per-token image/tile indices, in the run's `PromptFormat`)
  `MakeTargets`          -> `Example` (shifted targets and loss mask)

Bad records never raise: a transform returns a `Skipped` marker (source, record, reason,
detail) instead, and every later transform passes markers through unchanged. The mixture
stage (`mixture.AccountSkips`) counts them per source and reason and drops them.

Skip reasons (`SKIP_REASONS`): malformed_record, empty_conversation, answer_less_turn,
bad_conversation, image_placeholder_mismatch, missing_image, corrupt_image, too_many_tiles,
too_long, unsafe_image_path (an image path that resolves outside the source's image root:
`..`, an absolute path elsewhere, a symlink out; never read), remote_image (an image URL other
than `data:` or `file://`, e.g. http(s): never fetched), and record_error: every step runs
inside `Guarded`, so an exception nobody foresaw becomes a counted skip naming the step and the
exception instead of ending the iterator.

Pixels stay uint8 until batching (4x less memory per buffered sample); the batcher writes
ImageNet-normalised float32 straight into the batch array (`packing.BatchRows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from nvlm_jax.processing import prompt as prompt_lib
from nvlm_jax.processing import tiling
from nvlm_jax.processing.prompt_format import PromptFormat

MALFORMED_RECORD = "malformed_record"
EMPTY_CONVERSATION = "empty_conversation"
ANSWER_LESS_TURN = "answer_less_turn"
BAD_CONVERSATION = "bad_conversation"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_TILES = "too_many_tiles"
TOO_LONG = "too_long"
UNSAFE_IMAGE_PATH = "unsafe_image_path"
REMOTE_IMAGE = "remote_image"
RECORD_ERROR = "record_error"
SKIP_REASONS = (
    MALFORMED_RECORD,
    EMPTY_CONVERSATION,
    ANSWER_LESS_TURN,
    BAD_CONVERSATION,
    IMAGE_PLACEHOLDER_MISMATCH,
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    TOO_MANY_TILES,
    TOO_LONG,
    UNSAFE_IMAGE_PATH,
    REMOTE_IMAGE,
    RECORD_ERROR,
)

# An image as a record gives it: a file path, encoded bytes, a PIL image or uint8 [H, W, 3].
ImageRef = str | bytes | Image.Image | np.ndarray

_USER_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
_ROLES = _USER_ROLES | _ASSISTANT_ROLES | {"system"}


# ------------------------------------------------------------------------------------------
# Samples.


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marks a record that was dropped.

    Attributes:
      source: name of the data source (as in the data config).
      record: where the record lives, e.g. `/data/coco/train.jsonl:17`.
      reason: one of `SKIP_REASONS`.
      detail: the problem in words.
    """

    source: str
    record: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.record}: {self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True, eq=False)
class RawSample:
    """A parsed record.

    Attributes:
      source: data source name.
      record: record location (for error messages).
      conversation: turns `{"from": "human"|"gpt"|"system", "value": str}` (or role/content).
      images: one `ImageRef` per image, in `<image>` order; PIL images after `LoadImages`.
    """

    source: str
    record: str
    conversation: tuple[Mapping[str, Any], ...]
    images: tuple[ImageRef, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class TiledSample:
    """A sample with its images tiled.

    Attributes:
      pixels: uint8 `[num_tiles_total, t, t, 3]`: per image its regular tiles, then its thumbnail.
      num_tiles: tiles per image (thumbnail included).
      grids: `(cols, rows)` per image.
    """

    source: str
    record: str
    conversation: tuple[Mapping[str, Any], ...]
    pixels: np.ndarray
    num_tiles: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSample:
    """A tokenized sample: `prompt` from `prompt.build_training_example`, pixels as in `TiledSample`."""

    source: str
    record: str
    prompt: prompt_lib.EncodedPrompt
    pixels: np.ndarray
    num_tiles: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One training sequence before packing (L tokens, N tiles); indices are local to the sample.

    Attributes:
      input_ids: int32 `[L]`.
      targets: int32 `[L]`, `input_ids[t + 1]`; the pad id at the last position.
      loss_mask: bool `[L]`, True where `targets` is an answer token (or its `<|im_end|>`).
      token_image: int32 `[L]`, index of the latest image whose `<Image>` block starts at or before
        the token; -1 before the first image.
      token_tile: int32 `[L]`, for tile-tag tokens the tile they name; -1 elsewhere.
      pixels: uint8 `[N, t, t, 3]`.
      tile_image: int32 `[N]`, image index of each tile.
      stats: per-source record counts since the previous example (set by `mixture.AccountSkips`):
        `{source: {"seen": n, reason: n, ...}}`.
    """

    source: str
    record: str
    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    token_image: np.ndarray
    token_tile: np.ndarray
    pixels: np.ndarray
    tile_image: np.ndarray
    stats: dict[str, dict[str, int]] | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.tile_image.max()) + 1 if self.tile_image.size else 0


Element = RawSample | TiledSample | EncodedSample | Example | Skipped


# ------------------------------------------------------------------------------------------
# Conversation checks, images, tokens.


def _role(turn: Mapping[str, Any]) -> str | None:
    role = turn.get("from", turn.get("role"))
    return str(role).lower() if role is not None else None


def _value(turn: Mapping[str, Any]) -> Any:
    return turn.get("value", turn.get("content"))


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (valid JSON `"\\ud800"`, but no text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Guarded(grain.transforms.Map):
    """Runs one per-record step; an unexpected exception becomes a `Skipped` (record_error)
    naming the step and the exception, so one bad record can never end the iterator.

    The element is a sample (with `source`, `record`) or, before parsing, `(label, payload)`
    with the source name taken from the parse step."""

    def __init__(self, step: grain.transforms.Map):
        self.step = step

    def map(self, element: Any) -> Any:
        if isinstance(element, Skipped):
            return element
        try:
            return self.step.map(element)
        except Exception as e:  # noqa: BLE001 - the point: any failure of one record is that record's
            if isinstance(element, tuple) and len(element) == 2:
                source, record = getattr(self.step, "source", "?"), str(element[0])
            else:
                source, record = getattr(element, "source", "?"), getattr(element, "record", "?")
            detail = f"{type(self.step).__name__}: {type(e).__name__}: {e}"
            return Skipped(source, record, RECORD_ERROR, detail[:500])


class ValidateConversation(grain.transforms.Map):
    """Skips conversations the prompt builder would reject or that teach nothing.

    empty_conversation: no turns. malformed_record: a turn that is not `{from, value}` with a
    known role and string value. answer_less_turn: no assistant turn, an empty assistant
    answer, or a final user turn with no answer. image_placeholder_mismatch: user turns hold
    `<image>` placeholders but not one per image.
    """

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped):
            return element
        s, r = element.source, element.record
        turns = element.conversation
        if not turns:
            return Skipped(s, r, EMPTY_CONVERSATION, "the conversation has no turns")
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or _role(turn) not in _ROLES or not isinstance(_value(turn), str):
                return Skipped(s, r, MALFORMED_RECORD, f"turn {i} is not a {{from, value}} turn with a known role")
            if not _is_unicode(_value(turn)):
                return Skipped(s, r, MALFORMED_RECORD, f"turn {i} holds a lone surrogate (text that is not Unicode)")
        roles = [_role(t) for t in turns]
        if not any(role in _ASSISTANT_ROLES for role in roles):
            return Skipped(s, r, ANSWER_LESS_TURN, "no assistant turn")
        for i, turn in enumerate(turns):
            if _role(turn) in _ASSISTANT_ROLES and not _value(turn).strip():
                return Skipped(s, r, ANSWER_LESS_TURN, f"turn {i} is an empty answer")
        if roles[-1] not in _ASSISTANT_ROLES:
            return Skipped(s, r, ANSWER_LESS_TURN, f"the last turn ({roles[-1]}) has no answer")
        slots = sum(_value(t).count(prompt_lib.IMAGE_PLACEHOLDER) for t in turns if _role(t) in _USER_ROLES)
        if slots and slots != len(element.images):
            return Skipped(
                s, r, IMAGE_PLACEHOLDER_MISMATCH, f"{slots} <image> placeholder(s) for {len(element.images)} image(s)"
            )
        return element


class LoadImages(grain.transforms.Map):
    """Decodes every image reference to an RGB PIL image (`tiling.open_image`).

    missing_image: a path that does not exist. corrupt_image: undecodable, truncated, empty or
    over `max_pixels`.
    """

    def __init__(self, max_pixels: int | None = tiling.DEFAULT_MAX_PIXELS):
        self.max_pixels = max_pixels

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped) or not element.images:
            return element
        images = []
        for i, ref in enumerate(element.images):
            name = ref if isinstance(ref, str) else f"{element.record} image {i}"
            try:
                if isinstance(ref, np.ndarray):
                    ref = Image.fromarray(ref).convert("RGB")
                images.append(tiling.open_image(ref, source_name=name, max_pixels=self.max_pixels))
            except FileNotFoundError:
                return Skipped(element.source, element.record, MISSING_IMAGE, f"no such image file {name}")
            except (ValueError, OSError, TypeError) as e:
                return Skipped(element.source, element.record, CORRUPT_IMAGE, str(e))
        return dataclasses.replace(element, images=tuple(images))


class TileImages(grain.transforms.Map):
    """Tiles every image like the release (dynamic high resolution); uint8 tiles.

    `max_tiles` and `use_thumbnail` are the run's tile budget (`PromptFormat`): with
    `max_tiles=1` every image is resized to one tile and gets no thumbnail (the paper's stage-1
    pretraining). too_many_tiles: the images need more tiles than one row's bucket
    (`tiles_per_row`); checked from the grid choice, before any resizing.
    """

    def __init__(self, tile_size: int, max_tiles: int, use_thumbnail: bool, tiles_per_row: int):
        self.tile_size = tile_size
        self.max_tiles = max_tiles
        self.use_thumbnail = use_thumbnail
        self.tiles_per_row = tiles_per_row

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped):
            return element
        counts = []
        for image in element.images:
            cols, rows = tiling.select_grid(image.width, image.height, max_num=self.max_tiles, tile_size=self.tile_size)
            counts.append(cols * rows + int(self.use_thumbnail and cols * rows > 1))
        if sum(counts) > self.tiles_per_row:
            return Skipped(
                element.source,
                element.record,
                TOO_MANY_TILES,
                f"{sum(counts)} tiles {tuple(counts)} > tiles_per_row {self.tiles_per_row}",
            )
        tiled = [
            tiling.tile_image(
                image, self.max_tiles, tile_size=self.tile_size, use_thumbnail=self.use_thumbnail, normalize=False
            )
            for image in element.images
        ]
        t = self.tile_size
        pixels = np.concatenate([x.pixels for x in tiled]) if tiled else np.zeros((0, t, t, 3), np.uint8)
        return TiledSample(
            element.source,
            element.record,
            element.conversation,
            pixels,
            tuple(x.num_tiles for x in tiled),
            tuple(x.grid for x in tiled),
        )


class EncodeConversation(grain.transforms.Map):
    """Chat prompt with images expanded for the arch (tile tags + image tokens), then token ids.

    Uses `prompt.build_training_example` (ChatML, loss on answers only) with the tag style,
    tokens per tile, thumbnail rule and system message of `fmt`; the result also holds the
    per-token image and tile indices. bad_conversation: the prompt builder refused the
    conversation (the message says why).
    """

    def __init__(self, tokenizer: Any, *, arch: str, fmt: PromptFormat):
        self.tokenizer = tokenizer
        self.arch = arch
        self.fmt = fmt

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped):
            return element
        try:
            encoded = prompt_lib.build_training_example(
                self.tokenizer,
                element.conversation,
                element.num_tiles,
                system_message=self.fmt.system_message,
                arch=self.arch,
                tag_style=self.fmt.tag_style,
                grids=element.grids,
                tokens_per_tile=self.fmt.tokens_per_tile,
                use_thumbnail=self.fmt.use_thumbnail,
            )
        except ValueError as e:
            return Skipped(element.source, element.record, BAD_CONVERSATION, str(e))
        return EncodedSample(element.source, element.record, encoded, element.pixels, element.num_tiles)


class MakeTargets(grain.transforms.Map):
    """Next-token targets and shifted loss mask (`Example`); the per-token image/tile indices
    are the prompt encoder's (`EncodedPrompt.token_image`, `token_tile`), unshifted.

    too_long: more than `seq_len` tokens.
    """

    def __init__(self, *, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped):
            return element
        p = element.prompt
        length = int(p.input_ids.shape[0])
        if length > self.seq_len:
            return Skipped(element.source, element.record, TOO_LONG, f"{length} tokens > seq_len {self.seq_len}")
        ids = p.input_ids.astype(np.int32)
        targets = np.empty_like(ids)
        targets[:-1] = ids[1:]
        targets[-1] = self.pad_id
        loss_mask = np.zeros(length, bool)
        loss_mask[:-1] = p.loss_mask[1:]
        return Example(
            element.source,
            element.record,
            input_ids=ids,
            targets=targets,
            loss_mask=loss_mask,
            token_image=p.token_image,
            token_tile=p.token_tile,
            pixels=element.pixels,
            tile_image=p.tile_image,
        )

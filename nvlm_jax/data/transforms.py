"""Per-sample transforms, each a small named `grain.transforms.Map`, and the samples they pass on.

A record goes through, in order (`pipeline.make_dataset` wires them per source):

  parse (`ParseJsonLine` | `ParseMsgpackRecord` | `ParseTfdsExample` | `ParseRecordDict`)
    -> `RawSample` (conversation + image references)
  `ValidateConversation` -> same `RawSample`, or skipped
  `LoadImages`           -> `RawSample` whose images are decoded RGB PIL images
  `TileImages`           -> `TiledSample` (uint8 tiles `[N, t, t, 3]`, tiles per image, grids)
  `EncodeConversation`   -> `EncodedSample` (chat prompt with tile tags for the arch, token ids)
  `MakeTargets`          -> `Example` (shifted targets, loss mask, cross-attention indices)

Bad records never raise: a transform returns a `Skipped` marker (source, record, reason,
detail) instead, and every later transform passes markers through unchanged. The mixture
stage (`mixture.AccountSkips`) counts them per source and reason and drops them.

Skip reasons (`SKIP_REASONS`): malformed_record, empty_conversation, answer_less_turn,
bad_conversation, image_placeholder_mismatch, missing_image, corrupt_image, too_many_tiles,
too_long, ambiguous_image_marker.

Pixels stay uint8 until batching (4x less memory per buffered sample); the batcher writes
ImageNet-normalised float32 straight into the batch array (`packing.BatchRows`).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from PIL import Image

from nvlm_jax.processing import prompt as prompt_lib
from nvlm_jax.processing import tiling
from nvlm_jax.processing import tokenizer as tokenizer_lib

MALFORMED_RECORD = "malformed_record"
EMPTY_CONVERSATION = "empty_conversation"
ANSWER_LESS_TURN = "answer_less_turn"
BAD_CONVERSATION = "bad_conversation"
IMAGE_PLACEHOLDER_MISMATCH = "image_placeholder_mismatch"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_TILES = "too_many_tiles"
TOO_LONG = "too_long"
AMBIGUOUS_IMAGE_MARKER = "ambiguous_image_marker"
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
    AMBIGUOUS_IMAGE_MARKER,
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
# Parsing: source payloads -> RawSample.


def _as_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0:
        return _as_text(value.item())
    return value


def _resolve_image(ref: Any, image_root: str | None) -> ImageRef:
    if isinstance(ref, str):
        return ref if os.path.isabs(ref) or not image_root else os.path.join(image_root, ref)
    if isinstance(ref, (bytes, Image.Image)):
        return ref
    if isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and (ref.ndim == 2 or ref.ndim == 3):
        return ref
    if isinstance(ref, np.ndarray) and ref.dtype.kind in "SO" and ref.ndim == 0:
        return _resolve_image(ref.item(), image_root)
    raise TypeError(f"unsupported image reference of type {type(ref).__name__}")


def raw_sample_from_dict(source: str, record: str, obj: Any, image_root: str | None = None) -> RawSample | Skipped:
    """Canonical record dict -> `RawSample`, or `Skipped` (malformed_record) naming the problem.

    The dict holds `"conversations"` (LLaVA turns; `"messages"` is accepted too) and optionally
    `"image"` (one reference or a list) or `"images"` (a list). A string reference is a path,
    relative to `image_root` unless absolute.
    """
    if not isinstance(obj, Mapping):
        return Skipped(source, record, MALFORMED_RECORD, f"expected a JSON object, got {type(obj).__name__}")
    turns = obj.get("conversations", obj.get("messages"))
    if turns is None:
        return Skipped(source, record, MALFORMED_RECORD, "no 'conversations' field")
    if not isinstance(turns, Sequence) or isinstance(turns, (str, bytes)):
        return Skipped(source, record, MALFORMED_RECORD, f"'conversations' is a {type(turns).__name__}, not a list")
    refs = obj.get("images", obj.get("image"))
    if refs is None or (isinstance(refs, (str, bytes)) and not refs):
        refs = []
    elif isinstance(refs, (str, bytes, Image.Image)) or (isinstance(refs, np.ndarray) and refs.dtype == np.uint8):
        refs = [refs]
    try:
        images = tuple(_resolve_image(r, image_root) for r in refs)
    except TypeError as e:
        return Skipped(source, record, MALFORMED_RECORD, str(e))
    return RawSample(source, record, tuple(turns), images)


class ParseJsonLine(grain.transforms.Map):
    """`(label, line bytes)` from `sources.JsonlDataSource` -> `RawSample` (LLaVA/InternVL JSONL)."""

    def __init__(self, source: str, image_root: str | None = None):
        self.source = source
        self.image_root = image_root

    def map(self, element: tuple[str, bytes]) -> RawSample | Skipped:
        label, line = element
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"invalid JSON: {e}")
        return raw_sample_from_dict(self.source, label, obj, self.image_root)


class ParseMsgpackRecord(grain.transforms.Map):
    """`(label, record bytes)` from an ArrayRecord file -> `RawSample` (see `sources.encode_record`)."""

    def __init__(self, source: str, image_root: str | None = None):
        self.source = source
        self.image_root = image_root

    def map(self, element: tuple[str, bytes]) -> RawSample | Skipped:
        label, payload = element
        try:
            obj = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException, TypeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"invalid msgpack record: {e}")
        return raw_sample_from_dict(self.source, label, obj, self.image_root)


class ParseRecordDict(grain.transforms.Map):
    """`(label, canonical dict)` (e.g. from `synthetic.SyntheticDataSource`) -> `RawSample`."""

    def __init__(self, source: str, image_root: str | None = None):
        self.source = source
        self.image_root = image_root

    def map(self, element: tuple[str, Mapping[str, Any]]) -> RawSample | Skipped:
        label, obj = element
        return raw_sample_from_dict(self.source, label, obj, self.image_root)


class ParseTfdsExample(grain.transforms.Map):
    """`(label, TFDS feature dict)` -> `RawSample`.

    Either `conversations_key` names a feature holding LLaVA turns as JSON text, or
    `question_key`/`answer_key` name text features (a list of answers uses the first) and the
    user turn is `question_template.format(question=...)`. `image_key` names an image feature
    (encoded bytes when read with `SkipDecoding`, a uint8 array, or a list of those) or None.
    """

    def __init__(
        self,
        source: str,
        *,
        image_key: str | None = "image",
        question_key: str = "question",
        answer_key: str = "answer",
        conversations_key: str | None = None,
        question_template: str = "{question}",
    ):
        self.source = source
        self.image_key = image_key
        self.question_key = question_key
        self.answer_key = answer_key
        self.conversations_key = conversations_key
        self.question_template = question_template

    def _images(self, features: Mapping[str, Any]) -> list[Any]:
        if self.image_key is None:
            return []
        value = features.get(self.image_key)
        if value is None:
            return []
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
            return [value]
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 4:
            return list(value)
        if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
            return list(value)
        return [value]

    def map(self, element: tuple[str, Mapping[str, Any]]) -> RawSample | Skipped:
        label, features = element
        try:
            images = self._images(features)
            if self.conversations_key is not None:
                turns = json.loads(_as_text(features[self.conversations_key]))
            else:
                question = _as_text(features[self.question_key])
                answer = features[self.answer_key]
                if isinstance(answer, (list, tuple, np.ndarray)) and not isinstance(answer, (str, bytes)):
                    answer = answer[0] if len(answer) else ""
                question = self.question_template.format(question=question)
                if images and prompt_lib.IMAGE_PLACEHOLDER not in question:
                    question = prompt_lib.IMAGE_PLACEHOLDER * len(images) + "\n" + question
                turns = [{"from": "human", "value": question}, {"from": "gpt", "value": _as_text(answer)}]
        except (KeyError, IndexError, ValueError, UnicodeDecodeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"cannot read TFDS features: {e!r}")
        return raw_sample_from_dict(self.source, label, {"conversations": turns, "images": images})


# ------------------------------------------------------------------------------------------
# Conversation checks, images, tokens.


def _role(turn: Mapping[str, Any]) -> str | None:
    role = turn.get("from", turn.get("role"))
    return str(role).lower() if role is not None else None


def _value(turn: Mapping[str, Any]) -> Any:
    return turn.get("value", turn.get("content"))


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

    too_many_tiles: the images need more tiles than one row's bucket (`tiles_per_row`); checked
    from the grid choice, before any resizing.
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

    Uses `prompt.build_training_example` (ChatML, loss on answers only). bad_conversation: the
    prompt builder refused the conversation (the message says why).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        arch: str,
        tokens_per_tile: int,
        tag_style: str = "1d",
        use_thumbnail: bool = True,
        system_message: str | None = prompt_lib.DEFAULT_SYSTEM_MESSAGE,
    ):
        self.tokenizer = tokenizer
        self.arch = arch
        self.tokens_per_tile = tokens_per_tile
        self.tag_style = tag_style
        self.use_thumbnail = use_thumbnail
        self.system_message = system_message

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped):
            return element
        try:
            encoded = prompt_lib.build_training_example(
                self.tokenizer,
                element.conversation,
                element.num_tiles,
                system_message=self.system_message,
                arch=self.arch,
                tag_style=self.tag_style,
                grids=element.grids,
                tokens_per_tile=self.tokens_per_tile,
                use_thumbnail=self.use_thumbnail,
            )
        except ValueError as e:
            return Skipped(element.source, element.record, BAD_CONVERSATION, str(e))
        return EncodedSample(element.source, element.record, encoded, element.pixels, element.num_tiles)


class _TokenText:
    """Text of single token ids (cached), for locating `<Image>` in a token sequence."""

    def __init__(self, tokenizer: Any):
        self._backend = tokenizer_lib.text_encoder(tokenizer).backend
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._backend.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def join(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """Concatenated text of `ids` and the start offset of each token in it."""
        pieces = [self(int(i)) for i in ids]
        starts, pos = [], 0
        for piece in pieces:
            starts.append(pos)
            pos += len(piece)
        return "".join(pieces), starts


def image_start_tokens(
    input_ids: np.ndarray, tile_ids: np.ndarray, num_tiles: Sequence[int], token_text: Any
) -> np.ndarray | None:
    """Index of the token holding the `<` of each image's `<Image>` wrapper; None if ambiguous.

    Anchored on the image's first tag or image token (always present except for NVLM-X with tag
    style "none"): the `<Image>` text ends right where that tile's tag or pads begin, so the
    last `<Image>` in the text up to the end of the anchor token is the real one, even if user
    text contains "<Image>" too. Without anchors, the images' `<Image></Image>` texts are taken
    in order, and a count mismatch (user text holding that string) is ambiguous.

    Args:
      input_ids, tile_ids: `[L]` from `EncodedPrompt`.
      num_tiles: tiles per image.
      token_text: callable id -> text with a `join(ids) -> (text, starts)` method (`_TokenText`).

    Returns:
      int32 `[num_images]`, increasing.
    """
    if not num_tiles:
        return np.zeros((0,), np.int32)
    first = np.cumsum((0,) + tuple(num_tiles))
    is_tile = tile_ids >= 0
    starts = []
    for i in range(len(num_tiles)):
        hits = np.flatnonzero(is_tile & (tile_ids >= first[i]) & (tile_ids < first[i + 1]))
        if not hits.size:
            starts = None
            break
        p = int(hits[0])
        lo = max(0, p - 2 * len(prompt_lib.IMAGE_START))
        text, offsets = token_text.join(input_ids[lo : p + 1])
        q = text.rfind(prompt_lib.IMAGE_START)
        if q < 0:
            return None
        starts.append(lo + bisect.bisect_right(offsets, q) - 1)
    if starts is None:
        text, offsets = token_text.join(input_ids)
        marker = prompt_lib.IMAGE_START + prompt_lib.IMAGE_END
        found, pos = [], text.find(marker)
        while pos >= 0:
            found.append(bisect.bisect_right(offsets, pos) - 1)
            pos = text.find(marker, pos + 1)
        if len(found) != len(num_tiles):
            return None
        starts = found
    return np.asarray(starts, np.int32)


class MakeTargets(grain.transforms.Map):
    """Next-token targets, shifted loss mask, and per-token image/tile indices (`Example`).

    too_long: more than `seq_len` tokens. ambiguous_image_marker: see `image_start_tokens`.
    """

    def __init__(self, tokenizer: Any, *, seq_len: int, image_context_token_id: int, pad_id: int):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.image_context_token_id = image_context_token_id
        self.pad_id = pad_id
        self._token_text: _TokenText | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_token_text"] = None  # rebuilt in each worker
        return state

    def map(self, element: Element) -> Element:
        if isinstance(element, Skipped):
            return element
        p = element.prompt
        length = int(p.input_ids.shape[0])
        if length > self.seq_len:
            return Skipped(element.source, element.record, TOO_LONG, f"{length} tokens > seq_len {self.seq_len}")
        if self._token_text is None:
            self._token_text = _TokenText(self.tokenizer)
        starts = image_start_tokens(p.input_ids, p.tile_ids, element.num_tiles, self._token_text)
        if starts is None:
            return Skipped(
                element.source, element.record, AMBIGUOUS_IMAGE_MARKER, "cannot tell the <Image> blocks from user text"
            )
        ids = p.input_ids.astype(np.int32)
        targets = np.empty_like(ids)
        targets[:-1] = ids[1:]
        targets[-1] = self.pad_id
        loss_mask = np.zeros(length, bool)
        loss_mask[:-1] = p.loss_mask[1:]
        token_tile = np.where(ids == self.image_context_token_id, -1, p.tile_ids).astype(np.int32)
        token_image = (np.searchsorted(starts, np.arange(length), side="right") - 1).astype(np.int32)
        tile_image = np.repeat(np.arange(len(element.num_tiles), dtype=np.int32), element.num_tiles)
        return Example(
            element.source,
            element.record,
            input_ids=ids,
            targets=targets,
            loss_mask=loss_mask,
            token_image=token_image,
            token_tile=token_tile,
            pixels=element.pixels,
            tile_image=tile_image,
        )

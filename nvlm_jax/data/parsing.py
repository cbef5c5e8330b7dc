"""Parse transforms: a source's `(label, payload)` -> `transforms.RawSample` (or `Skipped`).

One per payload kind (`sources.py` picks it per source): `ParseJsonLine` (LLaVA/InternVL JSONL
lines), `ParseMsgpackRecord` (ArrayRecord msgpack records), `ParseTfdsExample` (TFDS feature
dicts) and `ParseRecordDict` (canonical dicts, e.g. synthetic tasks); all go through
`raw_sample_from_dict`. A record that cannot be read is a `Skipped` (malformed_record) naming
the problem, never an exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from PIL import Image

from nvlm_jax.data.transforms import MALFORMED_RECORD, UNSAFE_IMAGE_PATH, ImageRef, RawSample, Skipped
from nvlm_jax.processing import chat_template


def _as_text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0:
        return _as_text(value.item())
    return value


class UnsafeImagePath(ValueError):
    """An image path that resolves outside the source's image root."""


def resolve_image_path(path: str, image_root: str | None, allow_outside_root: bool = False) -> str:
    """The real path of image `path` (relative to `image_root` unless absolute), which must lie
    under `image_root` after resolving `..` and symlinks; `UnsafeImagePath` otherwise. Without
    an image root, or with `allow_outside_root`, any path is taken as given (absolute, or
    relative to the working directory)."""
    if "\0" in path:
        raise UnsafeImagePath(f"image path {path!r} contains a NUL byte")
    if image_root is None or allow_outside_root:
        return path if image_root is None or os.path.isabs(path) else os.path.join(image_root, path)
    root = os.path.realpath(image_root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise UnsafeImagePath(f"image path {path!r} resolves outside the image root {image_root} (to {real}); "
                              "allow_outside_root=True allows it")
    return real


def _resolve_image(ref: Any, image_root: str | None, allow_outside_root: bool = False) -> ImageRef:
    if isinstance(ref, str):
        return resolve_image_path(ref, image_root, allow_outside_root)
    if isinstance(ref, (bytes, Image.Image)):
        return ref
    if isinstance(ref, np.ndarray) and ref.dtype == np.uint8 and (ref.ndim == 2 or ref.ndim == 3):
        return ref
    if isinstance(ref, np.ndarray) and ref.dtype.kind in "SO" and ref.ndim == 0:
        return _resolve_image(ref.item(), image_root, allow_outside_root)
    raise TypeError(f"unsupported image reference of type {type(ref).__name__}")


def raw_sample_from_dict(source: str, record: str, obj: Any, image_root: str | None = None,
                         allow_outside_root: bool = False) -> RawSample | Skipped:
    """Canonical record dict -> `RawSample`, or `Skipped` naming the problem (malformed_record;
    unsafe_image_path for a path that escapes `image_root`, see `resolve_image_path`).

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
    if not isinstance(refs, Sequence | np.ndarray) or isinstance(refs, str | bytes):
        return Skipped(source, record, MALFORMED_RECORD, f"'images' is a {type(refs).__name__}, not a list")
    try:
        images = tuple(_resolve_image(r, image_root, allow_outside_root) for r in refs)
    except UnsafeImagePath as e:
        return Skipped(source, record, UNSAFE_IMAGE_PATH, str(e))
    except TypeError as e:
        return Skipped(source, record, MALFORMED_RECORD, str(e))
    return RawSample(source, record, tuple(turns), images)


class ParseJsonLine(grain.transforms.Map):
    """`(label, line bytes)` from `sources.JsonlDataSource` -> `RawSample` (LLaVA/InternVL JSONL)."""

    def __init__(self, source: str, image_root: str | None = None, allow_outside_root: bool = False):
        self.source = source
        self.image_root = image_root
        self.allow_outside_root = allow_outside_root

    def map(self, element: tuple[str, bytes]) -> RawSample | Skipped:
        label, line = element
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"invalid JSON: {e}")
        return raw_sample_from_dict(self.source, label, obj, self.image_root, self.allow_outside_root)


class ParseMsgpackRecord(grain.transforms.Map):
    """`(label, record bytes)` from an ArrayRecord file -> `RawSample` (see `sources.encode_record`)."""

    def __init__(self, source: str, image_root: str | None = None, allow_outside_root: bool = False):
        self.source = source
        self.image_root = image_root
        self.allow_outside_root = allow_outside_root

    def map(self, element: tuple[str, bytes]) -> RawSample | Skipped:
        label, payload = element
        try:
            obj = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException, TypeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"invalid msgpack record: {e}")
        return raw_sample_from_dict(self.source, label, obj, self.image_root, self.allow_outside_root)


class ParseRecordDict(grain.transforms.Map):
    """`(label, canonical dict)` (e.g. from `synthetic.SyntheticDataSource`) -> `RawSample`."""

    def __init__(self, source: str, image_root: str | None = None, allow_outside_root: bool = False):
        self.source = source
        self.image_root = image_root
        self.allow_outside_root = allow_outside_root

    def map(self, element: tuple[str, Mapping[str, Any]]) -> RawSample | Skipped:
        label, obj = element
        return raw_sample_from_dict(self.source, label, obj, self.image_root, self.allow_outside_root)


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
                if images and chat_template.IMAGE_PLACEHOLDER not in question:
                    question = chat_template.IMAGE_PLACEHOLDER * len(images) + "\n" + question
                turns = [{"from": "human", "value": question}, {"from": "gpt", "value": _as_text(answer)}]
        except (KeyError, IndexError, ValueError, UnicodeDecodeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"cannot read TFDS features: {e!r}")
        return raw_sample_from_dict(self.source, label, {"conversations": turns, "images": images})

"""Parse transforms: a source's `(label, payload)` -> `transforms.RawSample` (or `Skipped`).

One per payload kind (`sources.py` picks it per source): `ParseJsonLine` (JSONL lines),
`ParseMsgpackRecord` (ArrayRecord records: msgpack or JSON), `ParseTfdsExample` (TFDS feature
dicts) and `ParseRecordDict` (dicts, e.g. synthetic tasks or a JSON array's records); all go
through `raw_sample_from_dict`, which reads every record format of `formats.py` (LLaVA,
ShareGPT, OpenAI/HF chat messages). A record that cannot be read is a `Skipped` naming the
problem (malformed_record, unsafe_image_path, remote_image, ...), never an exception.
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

from nvlm_jax.data import formats
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
        ref = formats.image_from_url(ref)  # data: -> bytes, file:// -> path, http(s) refused
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
                         allow_outside_root: bool = False, record_format: str = "auto") -> RawSample | Skipped:
    """Record dict -> `RawSample`, or `Skipped` naming the problem (malformed_record;
    unsafe_image_path for a path that escapes `image_root`, see `resolve_image_path`;
    remote_image for an http(s) URL).

    The dict is a record in `record_format` (`formats.RECORD_FORMATS`; "auto": by its keys),
    brought to the canonical layout by `formats.canonical_record`: `"conversations"` (LLaVA
    turns) and optionally `"image"` (one reference or a list) or `"images"` (a list). A string
    reference is a path, relative to `image_root` unless absolute, or a data: / file:// URL.
    """
    if not isinstance(obj, Mapping):
        return Skipped(source, record, MALFORMED_RECORD, f"expected a JSON object, got {type(obj).__name__}")
    try:
        obj = formats.canonical_record(obj, record_format)
    except formats.RecordProblem as e:
        return Skipped(source, record, e.reason, str(e))
    turns = obj.get("conversations")
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
    except formats.RecordProblem as e:
        return Skipped(source, record, e.reason, str(e))
    except TypeError as e:
        return Skipped(source, record, MALFORMED_RECORD, str(e))
    return RawSample(source, record, tuple(turns), images)


class ParseJsonLine(grain.transforms.Map):
    """`(label, line bytes)` from `sources.JsonlDataSource` -> `RawSample` (JSONL of any record format)."""

    def __init__(self, source: str, image_root: str | None = None, allow_outside_root: bool = False,
                 record_format: str = "auto"):
        self.source = source
        self.image_root = image_root
        self.allow_outside_root = allow_outside_root
        self.record_format = formats.check_record_format(record_format)

    def map(self, element: tuple[str, bytes]) -> RawSample | Skipped:
        label, line = element
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Skipped(self.source, label, MALFORMED_RECORD, f"invalid JSON: {e}")
        return raw_sample_from_dict(self.source, label, obj, self.image_root, self.allow_outside_root,
                                    self.record_format)


class ParseMsgpackRecord(grain.transforms.Map):
    """`(label, record bytes)` from an ArrayRecord file -> `RawSample`: a msgpack record (see
    `sources.encode_record`) or, when the payload starts with `{`, a JSON record (a msgpack map
    never starts with that byte)."""

    def __init__(self, source: str, image_root: str | None = None, allow_outside_root: bool = False,
                 record_format: str = "auto"):
        self.source = source
        self.image_root = image_root
        self.allow_outside_root = allow_outside_root
        self.record_format = formats.check_record_format(record_format)

    def map(self, element: tuple[str, bytes]) -> RawSample | Skipped:
        label, payload = element
        if payload.lstrip()[:1] == b"{":
            try:
                obj = json.loads(payload)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return Skipped(self.source, label, MALFORMED_RECORD, f"invalid JSON record: {e}")
        else:
            try:
                obj = msgpack.unpackb(payload, raw=False)
            except (ValueError, msgpack.UnpackException, TypeError) as e:
                return Skipped(self.source, label, MALFORMED_RECORD, f"invalid msgpack record: {e}")
        return raw_sample_from_dict(self.source, label, obj, self.image_root, self.allow_outside_root,
                                    self.record_format)


class ParseRecordDict(grain.transforms.Map):
    """`(label, record dict)` (e.g. from `synthetic.SyntheticDataSource`, `sources.JsonArrayDataSource`)
    -> `RawSample`."""

    def __init__(self, source: str, image_root: str | None = None, allow_outside_root: bool = False,
                 record_format: str = "auto"):
        self.source = source
        self.image_root = image_root
        self.allow_outside_root = allow_outside_root
        self.record_format = formats.check_record_format(record_format)

    def map(self, element: tuple[str, Mapping[str, Any]]) -> RawSample | Skipped:
        label, obj = element
        return raw_sample_from_dict(self.source, label, obj, self.image_root, self.allow_outside_root,
                                    self.record_format)


class ParseTfdsExample(grain.transforms.Map):
    """`(label, TFDS feature dict)` -> `RawSample`.

    Either `conversations_key` names a feature holding the turns as JSON text, or
    `question_key`/`answer_key` name text features (a list of answers uses the first) and the
    user turn is `question_template.format(question=...)`; with neither `conversations_key` nor
    a `question_key` feature, a "conversations" or "messages" feature holds the turns. Turns are
    in `record_format` (`formats.RECORD_FORMATS`; a "messages" feature: chat messages, whose
    image parts take the images in order). `image_key` names an image feature (encoded bytes
    when read with `SkipDecoding`, a uint8 array, a path under `image_root`, or a list of those)
    or None.
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
        record_format: str = "auto",
        image_root: str | None = None,
    ):
        self.source = source
        self.record_format = formats.check_record_format(record_format)
        self.image_root = image_root
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
            key = self.conversations_key
            if key is None and self.question_key not in features:
                key = next((k for k in ("conversations", "messages") if k in features), None)
            if key is not None:
                turns = json.loads(_as_text(features[key]))
                if key == "messages" or self.record_format == "messages":
                    record = {"messages": turns, "images": images}
                    return raw_sample_from_dict(self.source, label, record, self.image_root,
                                                record_format=self.record_format)
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
        return raw_sample_from_dict(self.source, label, {"conversations": turns, "images": images}, self.image_root,
                                    record_format="sharegpt" if self.record_format == "auto" else self.record_format)

"""Data sources: where records come from, as random-access sequences of `(label, payload)`.

Each source spec (a frozen dataclass with a `name` and a mixture `weight`) knows how to open
one split as a random-access data source (`__len__`, `__getitem__`; what `grain.MapDataset.source`
takes) and which parse transform (`parsing.py`) turns its payloads into `transforms.RawSample`.
The label names the record in skip messages and errors (`/data/coco/train.jsonl:17`).

* `JsonlSource` — JSONL: one JSON object per line, LLaVA / InternVL style
  `{"image": path | [paths], "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`
  (or ShareGPT, or OpenAI/HF chat messages: `formats.py`); no "image" key (or null / []) for
  text-only samples. Relative image paths are resolved against `image_root` (default: the
  JSONL file's folder). The line offsets are indexed once when the split is opened (a
  vectorised scan, ~1 s/GB); blank lines are not records.
* `JsonArraySource` — one JSON file holding a list of such records (LLaVA's released
  `llava_v1_5_mix665k.json` layout); the whole file is read into memory when opened.
* `ArrayRecordSource` — ArrayRecord files of msgpack records (`encode_record`):
  `{"conversations": [...], "images": [encoded image bytes, ...]}` (or "image": bytes or a path),
  or of JSON records as in a JSONL line. msgpack keeps image bytes as bytes (JSON would need
  base64 `data:` URLs).
* `TfdsSource` — a prepared TFDS dataset read with `tfds.data_source` (ArrayRecord files; no
  TensorFlow needed). Image features are read undecoded (`SkipDecoding`) and decoded by
  `transforms.LoadImages`, so a corrupt image is a counted skip, not a crash.
* `SyntheticSource` — a built-in task from `synthetic.py`, generated on access.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import grain
import msgpack
import numpy as np

from nvlm_jax.data import formats, parsing, synthetic

_SCAN_CHUNK = 1 << 26  # bytes per chunk when indexing JSONL line offsets


class RecordSource(Protocol):
    """A random-access data source of `(label, payload)`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[str, Any]: ...


class SourceSpec(Protocol):
    """What the pipeline needs from a source entry of the data config."""

    name: str
    weight: float

    def open(self, split: str, *, tile_size: int) -> RecordSource:
        """The split as a random-access source (`tile_size`: the model's, for synthetic images)."""
        ...

    def parser(self, split: str) -> grain.transforms.Map:
        """The transform from this split's payloads to `transforms.RawSample`."""
        ...


def _split_path(name: str, paths: Mapping[str, Any], split: str) -> Any:
    if split not in paths:
        raise ValueError(f"data source {name!r} has no split {split!r}; it has {sorted(paths)}")
    return paths[split]


def _check_common(name: str, weight: float) -> None:
    if not name or "/" in name:
        raise ValueError(f"source name must be non-empty without '/', got {name!r}")
    if not weight > 0:
        raise ValueError(f"data source {name!r}: weight must be > 0, got {weight}")


# ------------------------------------------------------------------------------------------
# JSONL.


def index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offset, byte length (without the newline) and 1-based line number of each non-blank line.

    Returns:
      int64 `[num_records]` arrays `(starts, lengths, line_numbers)`.
    """
    ends: list[np.ndarray] = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        base = 0
        while chunk := f.read(_SCAN_CHUNK):
            ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base)
            base += len(chunk)
    newlines = np.concatenate(ends) if ends else np.zeros((0,), np.int64)
    line_ends = newlines if (size == 0 or (newlines.size and newlines[-1] == size - 1)) else np.append(newlines, size)
    line_starts = np.concatenate([[0], newlines + 1])[: line_ends.size]
    lengths = line_ends - line_starts
    keep = lengths > 0
    with open(path, "rb") as f:
        # Lines of only "\r" or spaces are blank too (cheap: only very short lines are read).
        for i in np.flatnonzero(keep & (lengths <= 8)):
            f.seek(int(line_starts[i]))
            if not f.read(int(lengths[i])).strip():
                keep[i] = False
    numbers = np.flatnonzero(keep) + 1
    return line_starts[keep].astype(np.int64), lengths[keep].astype(np.int64), numbers.astype(np.int64)


class JsonlDataSource:
    """Random access to the non-blank lines of a JSONL file: item i is `("path:line", bytes)`.

    Reads with `os.pread` on a descriptor opened lazily per process, so it is thread-safe and
    picklable (for `mp_prefetch` workers). The descriptor is closed by `close()`, when the source
    is garbage collected, or at interpreter exit (a `weakref.finalize`, which still works while
    the interpreter shuts down, unlike `__del__`).
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"JSONL file {path} does not exist")
        self.path = os.fspath(path)
        self._starts, self._lengths, self._lines = index_lines(self.path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._closer: weakref.finalize | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_fd=None, _pid=None, _closer=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            with self._lock:
                if self._fd is None or self._pid != os.getpid():
                    # A forked child opens its own descriptor; the inherited one is closed by
                    # the parent's finalizer, copied into the child, when the child exits.
                    fd = os.open(self.path, os.O_RDONLY)
                    self._fd, self._pid = fd, os.getpid()
                    self._closer = weakref.finalize(self, os.close, fd)
        return self._fd

    def close(self) -> None:
        """Closes this process's descriptor (a later read opens it again)."""
        with self._lock:
            if self._closer is not None and self._pid == os.getpid():
                self._closer()
            self._fd = self._pid = self._closer = None

    def __len__(self) -> int:
        return int(self._starts.shape[0])

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        i = index % len(self)
        data = os.pread(self._descriptor(), int(self._lengths[i]), int(self._starts[i]))
        return f"{self.path}:{int(self._lines[i])}", data

    def __repr__(self) -> str:
        return f"JsonlDataSource({self.path!r}, records={len(self)})"


@dataclasses.dataclass(frozen=True)
class _ConversationFiles:
    """What the file-backed sources share: fields, checks, and opening a split with the
    subclass's reader (`_reader`, random access to raw records) and parser (`_parser`)."""

    name: str
    paths: Mapping[str, str | Sequence[str]]
    image_root: str | None = None
    weight: float = 1.0
    allow_outside_root: bool = False
    record_format: str = "auto"

    _reader: ClassVar[type]
    _parser: ClassVar[type]

    def __post_init__(self):
        _check_common(self.name, self.weight)
        formats.check_record_format(self.record_format)

    def open(self, split: str, *, tile_size: int = 448) -> RecordSource:
        return self._reader(_split_path(self.name, self.paths, split))

    def parser(self, split: str = "train") -> grain.transforms.Map:
        return self._parser(self.name, _image_root(self.image_root, self.paths, split),
                            self.allow_outside_root, self.record_format)


@dataclasses.dataclass(frozen=True)
class JsonlSource(_ConversationFiles):
    """LLaVA/InternVL-style JSONL conversations (with or without images).

    Attributes:
      name: the source's name in the mixture and in skip counts.
      paths: split name -> JSONL file, e.g. `{"train": ".../train.jsonl", "eval": ...}`.
      image_root: folder that relative image paths are relative to (default: the file's folder).
        Image paths must stay under it (no `..` out, no absolute path elsewhere, no symlink out):
        others are skipped as unsafe_image_path and never read.
      weight: mixture weight.
      allow_outside_root: accept image paths outside `image_root` (absolute paths, `..`).
      record_format: the records' format (`formats.RECORD_FORMATS`; "auto": per record, by its keys).
    """

    _reader: ClassVar[type] = JsonlDataSource
    _parser: ClassVar[type] = parsing.ParseJsonLine


class JsonArrayDataSource:
    """Random access to the records of a JSON file holding one list: item i is `("path#i", record)`."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"JSON file {path} does not exist")
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"JSON file {path} cannot be read: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"JSON file {path} holds a {type(records).__name__}, not a list of records")
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        i = index % len(self)
        return f"{self.path}#{i}", self._records[i]

    def __repr__(self) -> str:
        return f"JsonArrayDataSource({self.path!r}, records={len(self)})"


@dataclasses.dataclass(frozen=True)
class JsonArraySource(_ConversationFiles):
    """A JSON file holding a list of records (any `formats.RECORD_FORMATS`); fields as `JsonlSource`."""

    _reader: ClassVar[type] = JsonArrayDataSource
    _parser: ClassVar[type] = parsing.ParseRecordDict


def _image_root(image_root: str | None, paths: Mapping[str, Any], split: str) -> str | None:
    """`image_root`, else the folder of the split's (first) file."""
    if image_root is not None or split not in paths:
        return image_root
    first = paths[split] if isinstance(paths[split], str) else next(iter(paths[split]), None)
    return None if first is None else os.path.dirname(os.path.abspath(first))


def write_jsonl(path: str, records: Iterable[Mapping[str, Any]]) -> str:
    """Writes records as JSON lines (for tests and small datasets); returns `path`."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------------------------------
# ArrayRecord.


def encode_record(conversations: Sequence[Mapping[str, Any]], images: Sequence[bytes | str] = ()) -> bytes:
    """One ArrayRecord record: msgpack `{"conversations": [...], "images": [bytes or path, ...]}`."""
    return msgpack.packb({"conversations": list(conversations), "images": list(images)}, use_bin_type=True)


def write_array_record(path: str, records: Iterable[bytes]) -> str:
    """Writes encoded records (`encode_record`) to one ArrayRecord file; returns `path`."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
    return path


class ArrayRecordDataSource:
    """Random access to ArrayRecord files: item i is `("file#i", bytes)` (global index over files)."""

    def __init__(self, paths: str | Sequence[str]):
        self.paths = [paths] if isinstance(paths, str) else list(paths)
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ArrayRecord file {p} does not exist")
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        self._label = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        i = index % len(self)
        return f"{self._label}#{i}", self._source[i]

    def __repr__(self) -> str:
        return f"ArrayRecordDataSource({self._label!r}, records={len(self)})"


@dataclasses.dataclass(frozen=True)
class ArrayRecordSource(_ConversationFiles):
    """ArrayRecord files of msgpack records (see `encode_record`).

    Attributes:
      name, weight: as `JsonlSource`.
      paths: split name -> one file or a list of files.
      image_root: folder for records that give image paths instead of bytes (default: the
        folder of the split's first file); paths must stay under it, as in `JsonlSource`.
      allow_outside_root, record_format: as in `JsonlSource`.
    """

    _reader: ClassVar[type] = ArrayRecordDataSource
    _parser: ClassVar[type] = parsing.ParseMsgpackRecord


# ------------------------------------------------------------------------------------------
# TFDS.


class TfdsDataSource:
    """A prepared TFDS split read through `tfds.data_source`: item i is `("name/split#i", features)`."""

    def __init__(self, tfds_name: str, split: str, data_dir: str | None, image_key: str | None):
        import tensorflow_datasets as tfds  # ~0.7 s import; only when a TFDS source is used

        decoders = {image_key: tfds.decode.SkipDecoding()} if image_key else None
        try:
            self._source = tfds.data_source(
                tfds_name, split=split, data_dir=data_dir, download=False, decoders=decoders
            )
        except Exception as e:  # tfds raises many types (AssertionError, DatasetNotFoundError, ...)
            raise ValueError(
                f"cannot open TFDS dataset {tfds_name!r} split {split!r} in {data_dir}: {type(e).__name__}: {e}"
            ) from e
        self._label = f"tfds:{tfds_name}/{split}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        i = index % len(self)
        return f"{self._label}#{i}", self._source[i]

    def __repr__(self) -> str:
        return f"TfdsDataSource({self._label!r}, records={len(self)})"


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A TFDS dataset prepared as ArrayRecord (e.g. by `builder.download_and_prepare()`).

    Attributes:
      name, weight: as `JsonlSource`.
      tfds_name: the TFDS name, optionally with config/version (`"my_vqa/default:1.0.0"`).
      data_dir: the TFDS data folder (None: TFDS's default).
      splits: our split name -> the TFDS split (e.g. `{"train": "train", "eval": "validation"}`).
      image_key: the image feature (bytes, array, or a sequence of them); None for text-only.
      question_key, answer_key, question_template, conversations_key, record_format: see
        `parsing.ParseTfdsExample` (without `conversations_key` or a question feature, a
        "conversations" or "messages" feature holds the turns as JSON text).
      image_root: the folder image features that are paths must stay under (None: paths are
        taken as given).
    """

    name: str
    tfds_name: str
    data_dir: str | None = None
    splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"train": "train", "eval": "validation"})
    image_key: str | None = "image"
    question_key: str = "question"
    answer_key: str = "answer"
    question_template: str = "{question}"
    conversations_key: str | None = None
    weight: float = 1.0
    record_format: str = "auto"
    image_root: str | None = None

    def __post_init__(self):
        _check_common(self.name, self.weight)
        formats.check_record_format(self.record_format)

    def open(self, split: str, *, tile_size: int = 448) -> TfdsDataSource:
        return TfdsDataSource(self.tfds_name, _split_path(self.name, self.splits, split), self.data_dir, self.image_key)

    def parser(self, split: str = "train") -> parsing.ParseTfdsExample:
        return parsing.ParseTfdsExample(
            self.name,
            image_key=self.image_key,
            question_key=self.question_key,
            answer_key=self.answer_key,
            conversations_key=self.conversations_key,
            question_template=self.question_template,
            record_format=self.record_format,
            image_root=self.image_root,
        )


# ------------------------------------------------------------------------------------------
# Synthetic.


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """A built-in synthetic task (see `synthetic.py`); needs no files.

    Attributes:
      name, weight: as `JsonlSource` (name defaults to the task).
      task: one of `synthetic.TASKS`.
      train_size: examples in the "train" split (indices `[0, train_size)`).
      eval_size: examples in each held-out split ("eval"/"validation", "test"; disjoint ranges).
      seed: dataset seed.
      image_spec: image sizes; default `synthetic.default_image_spec(task, model tile size)`.
    """

    task: str
    name: str = ""
    train_size: int = 100_000
    eval_size: int = 1_000
    seed: int = 0
    image_spec: synthetic.ImageSpec | None = None
    weight: float = 1.0

    def __post_init__(self):
        if self.task not in synthetic.TASKS:
            raise ValueError(f"unknown synthetic task {self.task!r}; available: {', '.join(synthetic.TASKS)}")
        if not self.name:
            object.__setattr__(self, "name", self.task)
        _check_common(self.name, self.weight)

    def open(self, split: str, *, tile_size: int = 28) -> synthetic.SyntheticDataSource:
        size = self.train_size if split == "train" else self.eval_size
        return synthetic.SyntheticDataSource(
            self.task, split, size, seed=self.seed, image_spec=self.image_spec, tile_size=tile_size
        )

    def parser(self, split: str = "train") -> parsing.ParseRecordDict:
        return parsing.ParseRecordDict(self.name)

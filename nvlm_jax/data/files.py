"""Datasets named on the command line (`--config.data.train=...`) -> source specs.

A value is one entry, several comma-separated entries, or (in a config file) a list of
entries; each entry is

    [PREFIX:]...LOCATION[:WEIGHT]

* LOCATION: a file, or for TFDS `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` (a dataset prepared under
  `data.tfds_data_dir` or TFDS's default folder; never downloaded; SPLIT defaults to "train"
  for training entries, "validation" for eval entries).
* WEIGHT: the entry's mixture weight (default 1): `a.jsonl:3,b.jsonl` draws 3 of `a` per 1 of
  `b` (`mixture.mix`).
* PREFIX: the container (`jsonl:`, `json:`, `arrayrecord:`, `tfds:`) and/or the record format
  (`llava:`, `sharegpt:`, `messages:`; see `formats.py`), e.g. `messages:chats.jsonl:2`.
  Without one the container is detected: `.jsonl` -> JSONL; `.array_record*` / `.arrayrecord`
  or the ArrayRecord (riegeli) signature -> ArrayRecord; otherwise the first non-blank byte:
  `[` -> one JSON list of records, `{` -> JSONL; the record format is the run's
  `data.format` ("auto": per record, by its keys).

Each entry becomes one source named after its file (`train.jsonl` -> "train"; repeated names
get `_2`, `_3`, ...), reading `split` from that file, with images under `image_root` (default:
the file's folder); image paths that escape it are skipped as unsafe_image_path, never read.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

from nvlm_jax.data import formats, sources

CONTAINERS = ("jsonl", "json", "arrayrecord", "tfds")
_PREFIXES = CONTAINERS + tuple(f for f in formats.RECORD_FORMATS if f != "auto")
_WEIGHT = re.compile(r"(.+):([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_RIEGELI_SIGNATURE = b"\x83\xafp\xd1\r\x88J?"  # the first 8 bytes of every ArrayRecord file
_TFDS_DEFAULT_SPLIT = {"train": "train", "eval": "validation"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parsed entry: `location` (a path or a TFDS name[:split]), its weight, its container
    (None: detect from the file) and record format ("" : the run's)."""

    location: str
    weight: float = 1.0
    container: str | None = None
    record_format: str = ""


def parse_entries(value: str | Sequence[str]) -> list[Entry]:
    """`value` (one entry, comma-separated entries, or a list of entries) -> entries."""
    texts = value.split(",") if isinstance(value, str) else [t for v in value for t in str(v).split(",")]
    entries = [parse_entry(t.strip()) for t in texts if t.strip()]
    if not entries:
        raise ValueError(f"no data entries in {value!r}; give a file, or 'path[:weight],path[:weight]'")
    return entries


def parse_entry(text: str) -> Entry:
    """One `[PREFIX:]...LOCATION[:WEIGHT]` entry (see the module docstring)."""
    container, record_format, rest = None, "", text
    while True:
        head, sep, tail = rest.partition(":")
        if not sep or head.lower() not in _PREFIXES:
            break
        head = head.lower()
        if head in CONTAINERS:
            if container is not None:
                raise ValueError(f"data entry {text!r} names two containers ({container}, {head})")
            container = head
        else:
            if record_format:
                raise ValueError(f"data entry {text!r} names two record formats ({record_format}, {head})")
            record_format = head
        rest = tail
        if container == "tfds":
            break  # the rest is NAME[/CONFIG][:SPLIT][:WEIGHT]
    weight = 1.0
    match = _WEIGHT.fullmatch(rest)
    if match:
        rest, weight = match.group(1), float(match.group(2))
    if not weight > 0:
        raise ValueError(f"data entry {text!r}: the weight must be > 0, got {weight}")
    if not rest:
        raise ValueError(f"data entry {text!r} names no file")
    return Entry(rest, weight, container, record_format)


def detect_container(path: str) -> str:
    """The container of data file `path`: "jsonl", "json" (one list) or "arrayrecord"."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"data entry {path} is a folder; name its files (comma-separated)")
    name = os.path.basename(path).lower()
    if name.endswith(".jsonl"):
        return "jsonl"
    if ".array_record" in name or name.endswith(".arrayrecord"):
        return "arrayrecord"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(_RIEGELI_SIGNATURE):
        return "arrayrecord"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]  # a UTF-8 BOM or blanks may come first
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    raise ValueError(f"cannot tell the format of data file {path} (not JSONL, a JSON list or ArrayRecord); "
                     f"name it with a prefix, e.g. jsonl:{path}")


def file_sources(value: str | Sequence[str], split: str, *, image_root: str | None = None,
                 record_format: str = "auto", tfds_data_dir: str | None = None,
                 allow_outside_root: bool = False) -> tuple[sources.SourceSpec, ...]:
    """Source specs for the entries of `value`, each reading its file as split `split`.

    Args:
      value: entries (see the module docstring).
      split: the pipeline split these entries are ("train" or "eval").
      image_root: folder every image path must stay under (None: each file's folder).
      record_format: the record format of entries without a format prefix.
      tfds_data_dir: TFDS data folder (None: TFDS's default).
      allow_outside_root: accept image paths outside the image root.
    """
    formats.check_record_format(record_format)
    specs, names = [], set()
    for entry in parse_entries(value):
        fmt = entry.record_format or record_format
        if entry.container == "tfds":
            tfds_name, tfds_split = _tfds_location(entry.location)
            name = _unique(re.sub(r"[^\w-]", "_", tfds_name.split(":")[0]), names)
            splits = {split: tfds_split or _TFDS_DEFAULT_SPLIT.get(split, split)}
            specs.append(sources.TfdsSource(name, tfds_name, data_dir=tfds_data_dir, splits=splits,
                                            weight=entry.weight, record_format=fmt, image_root=image_root))
            continue
        path = os.path.expanduser(entry.location)
        container = entry.container or detect_container(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} does not exist")
        name = _unique(_stem(path), names)
        kind = {"jsonl": sources.JsonlSource, "json": sources.JsonArraySource,
                "arrayrecord": sources.ArrayRecordSource}[container]
        specs.append(kind(name, {split: path}, image_root=image_root, weight=entry.weight,
                          allow_outside_root=allow_outside_root, record_format=fmt))
    return tuple(specs)


def _tfds_location(location: str) -> tuple[str, str]:
    """`NAME[/CONFIG][:VERSION][:SPLIT]` -> (TFDS name with its version, split or "")."""
    parts = location.split(":")
    name, rest = parts[0], parts[1:]
    if rest and re.fullmatch(r"\d+\.\d+\.\d+", rest[0]):
        name, rest = f"{name}:{rest[0]}", rest[1:]
    if len(rest) > 1:
        raise ValueError(f"TFDS entry {location!r}: expected NAME[/CONFIG][:VERSION][:SPLIT]")
    return name, rest[0] if rest else ""


def _stem(path: str) -> str:
    name = os.path.basename(path).split(".")[0] or "data"
    return re.sub(r"[^\w-]", "_", name)


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}_{n}"
    taken.add(out)
    return out

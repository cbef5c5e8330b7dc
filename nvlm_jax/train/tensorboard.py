"""TensorBoard scalar event files without TensorFlow: TFRecord framing + hand-encoded protobufs.

File format (what TensorBoard reads): a file named `events.out.tfevents.<time>.<host>` holding
records `uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`
(little endian), where `data` is a serialized `tensorflow.Event`:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first record carries `file_version = "brain.Event:2"`. CRC-32C (Castagnoli) is computed with
a table in pure Python; the mask is `((crc >> 15) | (crc << 17)) + 0xa282ead8` (mod 2^32).
`read_scalars` parses such files back (used by tests and handy for quick plots).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are encoded as 10-byte two's complement
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """A serialized `Event` with optional scalar summary values."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items()
        )
        out += _length_delimited(5, summary)
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing of one record."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Appends scalar summaries to a new event file in `logdir`; `flush()` makes them visible."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        self._file = open(self.path, "ab")
        self._file.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        """Writes one event holding all `values` (tag → number) at `step`."""
        event = encode_event(time.time() if wall_time is None else wall_time, int(step), values)
        self._file.write(frame_record(event))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# ---- reading ------------------------------------------------------------------------------------


def iter_records(path: str | os.PathLike) -> Iterator[bytes]:
    """The records of a TFRecord file; raises ValueError on a checksum mismatch. A truncated
    final record (a writer killed mid-write) ends the iteration."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            length, crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != crc:
                raise ValueError(f"{path}: corrupt record length checksum at offset {f.tell() - 12}")
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path}: corrupt record data checksum at offset {f.tell() - length - 4}")
            yield data


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos: pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos: pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos: pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} for field {field}")
        yield field, wire, value


def decode_event(data: bytes) -> dict:
    """A serialized Event → {"wall_time", "step", "file_version"?, "scalars": {tag: value}}."""
    event: dict = {"wall_time": 0.0, "step": 0, "scalars": {}}
    for field, _, value in _fields(data):
        if field == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            for vf, _, v in _fields(value):
                if vf != 1:
                    continue
                tag, number = None, None
                for f2, _, x in _fields(v):
                    if f2 == 1:
                        tag = x.decode()
                    elif f2 == 2:
                        number = struct.unpack("<f", x)[0]
                if tag is not None and number is not None:
                    event["scalars"][tag] = number
    return event


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """All scalars of all event files in `logdir` (sorted by file name): tag → [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for record in iter_records(path):
            event = decode_event(record)
            for tag, value in event["scalars"].items():
                out.setdefault(tag, []).append((event["step"], value))
    return out

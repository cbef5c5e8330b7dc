"""The TensorFlow-free event writer: CRC-32C, record framing, read back."""

import struct

import pytest

from nvlm_jax.train import tensorboard as tb


def test_crc32c_matches_the_standard_check_value():
    assert tb.crc32c(b"123456789") == 0xE3069283
    assert tb.crc32c(b"") == 0


def test_scalars_written_are_read_back(tmp_path):
    w = tb.EventWriter(tmp_path)
    w.scalars(1, {"train/loss": 2.5, "train/lr": 1e-4})
    w.scalars(2, {"train/loss": 1.25})
    w.close()
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1
    records = list(tb.iter_records(files[0]))
    assert tb.decode_event(records[0])["file_version"] == "brain.Event:2"
    scalars = tb.read_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 2.5), (2, 1.25)]
    assert scalars["train/lr"][0][0] == 1 and scalars["train/lr"][0][1] == pytest.approx(1e-4)


def test_record_framing_and_corruption_detection(tmp_path):
    data = tb.encode_event(123.0, 7, {"x": 1.0})
    framed = tb.frame_record(data)
    (length,) = struct.unpack("<Q", framed[:8])
    assert length == len(data) and framed[12:12 + length] == data
    path = tmp_path / "events.out.tfevents.1.test"
    path.write_bytes(framed + framed[:20])  # a torn second record (writer killed mid-write) is ignored
    assert [tb.decode_event(r)["step"] for r in tb.iter_records(path)] == [7]
    corrupt = bytearray(framed)
    corrupt[14] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt record data"):
        list(tb.iter_records(path))

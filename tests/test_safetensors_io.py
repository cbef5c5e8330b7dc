"""Our safetensors reader/writer against the official `safetensors` library."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from nvlm_jax.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorSpec, dtype_tag, load_file, save_file


def _official_file(path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(7, generator=g),
        "c.f16": torch.randn(2, 2, 2, generator=g).to(torch.float16),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
        "g.scalar": torch.tensor(3.5),
    }
    torch_save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def test_reads_every_dtype_written_by_the_official_library(tmp_path):
    path = tmp_path / "x.safetensors"
    want = _official_file(path)
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    assert sorted(f.keys()) == sorted(want)
    for key, t in want.items():
        got = f.read(key)
        mapped = f.tensor(key)
        assert got.shape == tuple(t.shape)
        if t.dtype == torch.bfloat16:
            assert got.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
        else:
            np.testing.assert_array_equal(got, t.numpy())
        np.testing.assert_array_equal(np.asarray(mapped).reshape(-1).view(np.uint8), got.reshape(-1).view(np.uint8))


def test_tensor_is_a_zero_copy_memory_map(tmp_path):
    path = tmp_path / "x.safetensors"
    _official_file(path)
    m = SafetensorsFile(path).tensor("a.bf16")
    assert isinstance(m, np.memmap) and not m.flags.writeable


def test_written_files_load_in_the_official_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((4, 3)).astype(np.float32).astype(ml_dtypes.bfloat16),
        "b": rng.standard_normal(5).astype(np.float32),
        "i": np.arange(10, dtype=np.int32).reshape(2, 5),
        "z": np.zeros((0,), np.float16),
    }
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (8 + header_len) % 8 == 0
    official = torch_load_file(str(path))
    np.testing.assert_array_equal(official["w"].float().numpy(), tensors["w"].astype(np.float32))
    np.testing.assert_array_equal(official["b"].numpy(), tensors["b"])
    np.testing.assert_array_equal(official["i"].numpy(), tensors["i"])
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
    back = load_file(path)
    assert all(np.array_equal(back[k].view(np.uint8), np.asarray(v).view(np.uint8)) for k, v in tensors.items())


def test_writer_casts_with_round_to_nearest_even_like_torch(tmp_path):
    x = np.array([1.00390625, 1.01171875, -2.5e-3, 3.0e38, 1e-40, 65504.0], np.float32)  # ties and extremes
    path = tmp_path / "cast.safetensors"
    with SafetensorsWriter(path, [TensorSpec("x", x.shape, ml_dtypes.bfloat16)]) as w:
        w.write("x", x)
    got = SafetensorsFile(path).read("x").view(np.uint16)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, want)


def test_writer_streams_in_any_order_and_checks_every_tensor(tmp_path):
    specs = [TensorSpec("a", (2,), np.float32), TensorSpec("b", (3,), np.float32)]
    path = tmp_path / "s.safetensors"
    with SafetensorsWriter(path, specs) as w:
        w.write("b", np.ones(3))
        w.write("a", np.zeros(2))
    assert SafetensorsFile(path).read("b").tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=r"declared but not written: \['b'\]"):
        with SafetensorsWriter(tmp_path / "m.safetensors", specs) as w:
            w.write("a", np.zeros(2))
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.safetensors.tmp").exists()
    with SafetensorsWriter(tmp_path / "n.safetensors", specs) as w:
        with pytest.raises(ValueError, match="shape"):
            w.write("a", np.zeros(3))
        with pytest.raises(ValueError, match="not declared"):
            w.write("c", np.zeros(3))
        w.write("a", np.zeros(2))
        w.write("b", np.zeros(3))


def test_truncated_file_is_reported_with_its_name(tmp_path):
    path = tmp_path / "t.safetensors"
    _official_file(path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"t\.safetensors: truncated safetensors file: data runs to byte"):
        SafetensorsFile(path)
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match="truncated or not a safetensors file: its header runs past the end"):
        SafetensorsFile(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="no header length"):
        SafetensorsFile(path)


def _raw_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, message",
    [
        ({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, "unsupported dtype 'C64'"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, r"hold 8 bytes, shape \(3,\) x F32 needs 12"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "invalid shape"),
    ],
)
def test_malformed_headers_are_rejected(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, b"\0" * 16)
    with pytest.raises(ValueError, match=message):
        SafetensorsFile(path)


def test_non_json_header_is_rejected(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ValueError, match="not valid JSON"):
        SafetensorsFile(path)


@pytest.mark.parametrize("secret", [b"root:x:0:0:root:/root:/bin/bash\n", b"\x10\0\0\0\0\0\0\0SECRET-TOKEN-xyz",
                                    b"\x08\0\0\0\0\0\0\0\xffSECRET\xfe"])
def test_errors_on_foreign_files_never_echo_their_bytes(tmp_path, secret):
    path = tmp_path / "passwd"
    path.write_bytes(secret)
    with pytest.raises(ValueError) as e:
        SafetensorsFile(path)
    message = str(e.value).replace(str(path), "<path>")
    assert message.startswith("<path>: ")
    for chunk in (b"root", b"SECRET", b"bash"):
        assert chunk.decode() not in message
    head = int.from_bytes(secret[:8], "little")
    if head > 100:  # a large length field is the first 8 bytes, reversibly
        assert str(head) not in message


def test_unknown_key_and_unstorable_dtype():
    with pytest.raises(ValueError, match="cannot be stored"):
        dtype_tag(np.complex64)
    assert dtype_tag(np.dtype(">f4")) == "F32"

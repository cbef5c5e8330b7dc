"""Hostile checkpoints and hostile conversions: nothing lost, nothing silently wrong.

Each class of hostile input is answered by a named error (or a logged, bounded cleanup), the
sources stay byte-identical, and nothing half-written is left behind:

  output folder = / inside / holding / symlinked to a source       refused before anything is touched
  float tensors re-tagged as integers, NaN / Inf weights, a wrong index total_size
  shard names that leave the folder (.., separators, absolute paths, non-strings)
  damaged, missing or extra files in a converted folder (sha256 manifest)
  staging folders of killed runs, folder permissions, non-float dtypes, --out_dir under a file,
  damaged tokenizer files
"""

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax.checkpoint import assemble as assemble_lib
from nvlm_jax.checkpoint import export as export_lib
from nvlm_jax.checkpoint import hf_folder, hf_import, manifest, plan, writers
from nvlm_jax.safetensors_io import dtype_tag
from nvlm_jax.sharding import make_mesh
from tests import hf_checkpoint as hc
from tests.cpu_env import cpu_env

REPO = Path(__file__).resolve().parents[2]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


@pytest.fixture
def hf(release, tmp_path):
    """A private copy of the tiny release (tests damage it)."""
    return hc.copy_release(release, tmp_path / "src" / "hf")


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_cli(args, cwd):
    env = cpu_env()
    return subprocess.run([sys.executable, "-m", "nvlm_jax.convert", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_exit_2(run, message):
    assert run.returncode == 2, run.stderr[-2000:]
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]


def _edit_header(path: Path, edit) -> None:
    """Rewrites a safetensors file's JSON header through `edit(header)` (data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


def _keys_of_dtype(folder: Path, tag: str) -> list[str]:
    """The keys of `folder`'s tensors stored as `tag` (at least two elements)."""
    out = []
    for name in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values())):
        f = hf_folder.SafetensorsFile(folder / name)
        out += [k for k in f.keys() if dtype_tag(f.info(k).dtype) == tag and f.info(k).nbytes >= 8]
    return out


def _poke(folder: Path, key: str, index: int, raw: bytes) -> None:
    """Overwrites element `index` of tensor `key` with the bytes `raw`."""
    path = _shard_of(folder, key)
    info = hf_folder.SafetensorsFile(path).info(key)
    with open(path, "r+b") as f:
        f.seek(info.begin + index * info.dtype.itemsize)
        f.write(raw)


# ---- 1. the output folder never overlaps a source ----------------------------------------------

RELATIONS = ["same", "inside", "parent", "symlink"]


def _target(src: Path, relation: str, tmp_path: Path) -> Path:
    """An output folder in `relation` to `src` (which lives at <something>/<name>)."""
    if relation == "same":
        return src
    if relation == "inside":
        return src / "out"
    if relation == "parent":
        return src.parent
    alias = tmp_path / "alias"
    alias.symlink_to(src, target_is_directory=True)
    return alias


@pytest.mark.parametrize("relation", RELATIONS)
def test_convert_refuses_an_out_dir_overlapping_its_source(hf, tmp_path, relation):
    before = _fingerprint(hf.parent)
    out = _target(hf, relation, tmp_path)
    with pytest.raises(ValueError, match="would delete or change the source"):
        hf_import.convert(hf, out, overwrite=True, progress=False)
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="would delete or change the source"):
        hf_import.convert_sharded(hf, out, mesh, overwrite=True, progress=False)
    assert _fingerprint(hf.parent) == before


@pytest.mark.parametrize("relation", RELATIONS)
def test_export_refuses_an_out_dir_overlapping_its_source(tmp_path, relation):
    import shutil

    src = Path(shutil.copytree(hc.tiny_converted(), tmp_path / "src" / "ckpt"))
    before = _fingerprint(src.parent)
    with pytest.raises(ValueError, match="would delete or change the source"):
        export_lib.export_checkpoint(src, _target(src, relation, tmp_path), overwrite=True)
    assert _fingerprint(src.parent) == before


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("which", ["vit", "llm"])
def test_assemble_refuses_an_out_dir_overlapping_a_source(tmp_path, relation, which):
    dirs = {name: tmp_path / name / "model" for name in ("vit", "llm")}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    before = {n: _fingerprint(d.parent) for n, d in dirs.items()}
    out = _target(dirs[which], relation, tmp_path)
    with pytest.raises(ValueError, match=f"the {dict(vit='ViT', llm='LLM')[which]} folder"):
        assemble_lib.assemble(dirs["vit"], dirs["llm"], out, overwrite=True, progress=False)
    assert {n: _fingerprint(d.parent) for n, d in dirs.items()} == before


def test_cli_refuses_overlapping_folders_in_one_line(hf, tmp_path):
    before = _fingerprint(hf.parent)
    run = _run_cli([f"--hf_dir={hf}", f"--out_dir={hf.parent}", "--overwrite", "--noprogress"], tmp_path)
    _one_line_exit_2(run, "would delete or change the source")
    assert _fingerprint(hf.parent) == before


# ---- 2. silently wrong weights -------------------------------------------------------------------


@pytest.mark.parametrize("stored, fake", [("F32", "I32"), ("F32", "U32"), ("BF16", "I16"), ("BF16", "U16")])
def test_float_tensors_retagged_as_integers_are_named(hf, tmp_path, stored, fake):
    key = _keys_of_dtype(hf, stored)[0]
    shard = _shard_of(hf, key)
    _edit_header(shard, lambda h: h[key].update(dtype=fake))
    with pytest.raises(ValueError, match=f"'{key}' \\({shard.name}\\): stored as {fake}, an integer/bool type"):
        hf_import.convert(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


NON_FINITE = {"nan": {"F32": struct.pack("<f", float("nan")), "BF16": b"\xc0\x7f"},
              "inf": {"F32": struct.pack("<f", float("inf")), "BF16": b"\x80\x7f"},
              "-inf": {"F32": struct.pack("<f", float("-inf")), "BF16": b"\x80\xff"}}


@pytest.mark.parametrize("value", sorted(NON_FINITE))
@pytest.mark.parametrize("stored", ["F32", "BF16"])
def test_non_finite_weights_are_named_while_streaming(hf, tmp_path, value, stored):
    key = [k for k in _keys_of_dtype(hf, stored) if "vision_model" not in k][-1]  # no dummy-head check
    _poke(hf, key, 1, NON_FINITE[value][stored])
    shard = _shard_of(hf, key).name
    match = f"tensor '{key}' \\(.*{shard}\\) holds 1 non-finite values"
    with pytest.raises(plan.NonFiniteError, match=match):
        hf_import.convert(hf, tmp_path / "out", progress=False)
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    with pytest.raises(plan.NonFiniteError, match=match):
        hf_import.convert_sharded(hf, tmp_path / "out", mesh, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging left
    if value == "nan":
        with pytest.raises(plan.NonFiniteError, match=match):
            nvlm_jax.load_pretrained(hf, dtype="float32")
        out = hf_import.convert(hf, tmp_path / "out", progress=False, check_finite=False)
        assert out.is_dir()


def test_count_nonfinite_works_in_bounded_blocks(monkeypatch):
    monkeypatch.setattr(plan, "FINITE_BLOCK_BYTES", 64)
    x = np.ones((37, 5, 3), np.float32)
    x[0, 0, 0], x[36, 4, 2], x[20, 1, 1] = np.nan, np.inf, -np.inf
    assert plan.count_nonfinite(x) == 3 and plan.count_nonfinite(x[:, :, 1:]) == 2
    assert plan.count_nonfinite(np.float32(np.nan)) == 1 and plan.count_nonfinite(np.ones(0)) == 0


@pytest.mark.parametrize("total", ["+2", "-1", "0", "'12'", "None-set-to-list", "1.5"])
def test_a_wrong_index_total_size_is_a_listed_problem(hf, tmp_path, total):
    index = json.loads((hf / INDEX).read_text())
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = {"+2": right + 2, "-1": -1, "0": 0, "'12'": "12", "None-set-to-list": [right],
                                       "1.5": right + 0.5}[total]
    (hf / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="metadata.total_size is .*, but its tensors hold"):
        hf_import.convert(hf, tmp_path / "out", progress=False)


# ---- 3. the integrity manifest ---------------------------------------------------------------


def _largest_params_file(folder: Path) -> Path:
    return max((p for p in (folder / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_converted_folders_carry_a_manifest_of_every_file(release, tmp_path):
    out = hf_import.convert(release.folder, tmp_path / "a", progress=False)
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    sharded, _ = hf_import.convert_sharded(release.folder, tmp_path / "b", mesh, progress=False)
    for folder in (out, sharded):
        listed = json.loads((folder / manifest.MANIFEST_FILE).read_text())["files"]
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(listed) == files - {manifest.MANIFEST_FILE}
        assert any(name.startswith("params/") for name in listed) and "nvlm_config.json" in listed
        assert manifest.verify_manifest(folder) == len(listed)
        assert not any(name.endswith(writers.STAGING_MARKER) for name in listed)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "extra", "no_manifest", "bad_manifest"])
def test_verify_names_damaged_missing_and_extra_files(release, tmp_path, damage):
    out = hf_import.convert(release.folder, tmp_path / "ckpt", dtype="float32", progress=False)
    victim = _largest_params_file(out)
    rel = victim.relative_to(out).as_posix()
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        want = f"damaged file {rel}: its sha256 differs"
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
        want = f"damaged file {rel}: "
    elif damage == "delete":
        victim.unlink()
        want = f"missing file {rel}"
    elif damage == "extra":
        (out / "params" / "stray.bin").write_bytes(b"x")
        want = "extra file params/stray.bin"
    elif damage == "no_manifest":
        (out / manifest.MANIFEST_FILE).unlink()
        want = f"no {manifest.MANIFEST_FILE}"
    else:
        (out / manifest.MANIFEST_FILE).write_text("[1, 2]")
        want = "is not an nvlm_jax.manifest manifest"
    with pytest.raises(manifest.ManifestError, match=want):
        nvlm_jax.load_pretrained(out, dtype="float32", verify=True)


def test_verify_cli(release, tmp_path):
    out = hf_import.convert(release.folder, tmp_path / "ckpt", progress=False)
    run = _run_cli([f"--verify={out}"], tmp_path)
    assert run.returncode == 0 and "files match its manifest" in run.stdout, run.stderr[-2000:]
    victim = _largest_params_file(out)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    run = _run_cli([f"--verify={out}"], tmp_path)
    assert run.returncode == 1 and f"damaged file {victim.relative_to(out).as_posix()}" in run.stderr
    assert "Traceback" not in run.stderr


def test_file_hash_reads_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "HASH_BLOCK_BYTES", 7)
    data = os.urandom(1000)
    (tmp_path / "f").write_bytes(data)
    assert manifest.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# ---- 4. shard names stay inside the folder -------------------------------------------------------

ESCAPES = ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ".", "", "a\\b.safetensors",
           "model.safetensors\x00.txt", 5, None]


@pytest.mark.parametrize("name", ESCAPES, ids=repr)
def test_shard_names_outside_the_folder_are_never_opened(release, hf, tmp_path, monkeypatch, name):
    index = json.loads((hf / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    # A valid shard outside the folder that holds the key: following the name would "work".
    hc.copy_release(release, tmp_path / "elsewhere")
    os.replace(_shard_of(tmp_path / "elsewhere", key), tmp_path / "src" / "outside.safetensors")
    index["weight_map"][key] = name
    (hf / INDEX).write_text(json.dumps(index))
    opened = []
    real = hf_folder.SafetensorsFile

    def spy(path):
        opened.append(Path(path))
        return real(path)

    monkeypatch.setattr(hf_folder, "SafetensorsFile", spy)
    with pytest.raises(ValueError, match="which is not a file name inside"):
        hf_import.convert(hf, tmp_path / "out", progress=False)
    assert opened and all(p.parent == hf for p in opened), opened


# ---- 5. leftovers of killed runs, folder permissions ----------------------------------------------


def _staging(parent: Path, name: str, marker: dict | None, age_s: float = 0) -> Path:
    d = parent / name
    d.mkdir(parents=True)
    (d / "junk").write_bytes(b"x" * 10)
    if marker is not None:
        (d / writers.STAGING_MARKER).write_text(json.dumps(marker))
    if age_s:
        t = time.time() - age_s
        os.utime(d, (t, t))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_folders_of_dead_runs_are_removed_and_reported(release, tmp_path, caplog):
    import socket

    host = socket.gethostname()
    parent = tmp_path / "runs"
    # A run killed after creating its staging folder (no cleanup ran).
    script = ("import os, sys; from nvlm_jax.checkpoint.writers import Staging; "
              "s = Staging(sys.argv[1], False); print(s.tmp); os._exit(0)")
    killed = Path(subprocess.run([sys.executable, "-c", script, str(parent / "ckpt")], cwd=REPO, check=True,
                                 capture_output=True, text=True,
                                 env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.strip())
    assert killed.is_dir() and (killed / writers.STAGING_MARKER).is_file()
    dead = _staging(parent, ".ckpt.tmp-dead", {"pid": _dead_pid(), "host": host})
    old = _staging(parent, ".other.tmp-old", None, age_s=2 * 3600)
    live = _staging(parent, ".ckpt.tmp-live", {"pid": os.getpid(), "host": host})
    young = _staging(parent, ".other.tmp-young", None)
    remote = _staging(parent, ".ckpt.tmp-remote", {"pid": _dead_pid(), "host": host + "-elsewhere"})
    garbled = _staging(parent, ".ckpt.tmp-garbled", None)
    (garbled / writers.STAGING_MARKER).write_text("{not json")
    not_staging = _staging(parent, "keep.tmp-me", None, age_s=2 * 3600)
    with caplog.at_level(logging.WARNING, logger=writers.__name__):
        hf_import.convert(release.folder, parent / "ckpt", progress=False)
    for gone in (dead, old, killed):
        assert not gone.exists()
        assert f"removed {gone}, the staging folder of a conversion that died" in caplog.text
    for kept in (live, young, remote, garbled, not_staging):
        assert kept.is_dir() and (kept / "junk").is_file()
    hidden = {p.name for p in parent.iterdir() if p.name.startswith(".")}
    assert hidden == {p.name for p in (live, young, remote, garbled)}  # the conversion's own staging is gone


def test_output_folders_get_the_same_permissions_sharded_or_not(release, tmp_path):
    mask = os.umask(0o022)
    try:
        out = hf_import.convert(release.folder, tmp_path / "a", progress=False)
        mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
        sharded, _ = hf_import.convert_sharded(release.folder, tmp_path / "b", mesh, progress=False)
        exported = export_lib.export_checkpoint(out, tmp_path / "c")
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (out, sharded, exported)}
    assert modes == {"a": 0o755, "b": 0o755, "c": 0o755}


# ---- 6. small ones: dtypes, --out_dir under a file, damaged tokenizers -------------------------


@pytest.mark.parametrize("dtype", ["int8", "int32", "bool", "uint16", "complex64", "nonsense"])
def test_non_float_dtypes_are_refused_before_reading(hf, tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(plan, "open_safetensors", lambda *a: pytest.fail("read the source"))
    with pytest.raises(ValueError, match=f"dtype .*{'is not a dtype' if dtype == 'nonsense' else 'not a floating'}"):
        hf_import.convert(hf, tmp_path / "out", dtype=dtype, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        assemble_lib.assemble(hf, hf, tmp_path / "out2", dtype=dtype, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_out_dir_under_a_regular_file_is_named(hf, tmp_path):
    (tmp_path / "somefile").write_text("x")
    with pytest.raises(ValueError, match="somefile is a file, not a folder"):
        hf_import.convert(hf, tmp_path / "somefile" / "deeper" / "out", progress=False)


@pytest.mark.parametrize("args, message", [
    (["--hf_dir={hf}", "--out_dir={tmp}/o", "--dtype=int8"], "dtype int8 is not a floating-point dtype"),
    (["--hf_dir={hf}", "--out_dir={tmp}/o", "--dtype=nonsense"], "'nonsense' is not a dtype"),
    (["--hf_dir={hf}", "--out_dir={tmp}/somefile/out"], "somefile is a file, not a folder"),
])
def test_cli_small_mistakes_are_one_line(hf, tmp_path, args, message):
    (tmp_path / "somefile").write_text("x")
    run = _run_cli([a.format(hf=hf, tmp=tmp_path) for a in args], tmp_path)
    _one_line_exit_2(run, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "tokenizer.json: cannot read JSON"),
    ('{"model": 1}', "cannot load tokenizer"),
    ("", "tokenizer.json: cannot read JSON"),
    (b"\xff\xfe\x00garbage", "tokenizer.json: cannot read JSON"),
])
@pytest.mark.parametrize("kind", ["hf", "converted"])
def test_damaged_tokenizer_files_are_named(hf, tmp_path, content, message, kind):
    import shutil

    folder = hf if kind == "hf" else Path(shutil.copytree(hc.tiny_converted(), tmp_path / "ckpt"))
    tok = folder / "tokenizer.json"
    tok.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        nvlm_jax.load_pretrained(folder, dtype="float32")

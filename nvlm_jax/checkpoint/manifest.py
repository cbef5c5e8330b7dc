"""The integrity manifest of a converted folder: the size and sha256 of every file under it,
written last (so a folder that has one was written completely) and checked on request
(`load_pretrained(..., verify=True)`, `python -m nvlm_jax.convert --verify=DIR`).

    out_dir/nvlm_manifest.json   {"format": "nvlm_jax.manifest", "algorithm": "sha256",
                                  "files": {"params/...": {"size": 123, "sha256": "..."}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_FILE = "nvlm_manifest.json"
MANIFEST_FORMAT = "nvlm_jax.manifest"
HASH_BLOCK_BYTES = 4 * 1024**2


class ManifestError(ValueError):
    """A converted folder whose files do not match its manifest (or that has none)."""


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in blocks of `HASH_BLOCK_BYTES` (never the whole file at once)."""
    digest = hashlib.sha256()
    buf = bytearray(HASH_BLOCK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every regular file under `folder` (symlinks followed), as sorted relative POSIX paths,
    the manifest itself left out."""
    out = []
    for root, _, names in os.walk(folder, followlinks=True):
        for name in names:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str | os.PathLike) -> Path:
    """Hashes every file under `folder` into `folder/nvlm_manifest.json`; returns its path."""
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
             for rel in _files(folder)}
    data = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def manifest_problems(folder: str | os.PathLike) -> list[str]:
    """What differs between `folder` and its manifest: missing, extra, resized or changed files
    (each named); one problem when there is no readable manifest."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"no {MANIFEST_FILE} (written by conversions since the manifest was added); nothing to verify against"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{MANIFEST_FILE} is unreadable: {type(e).__name__}"]
    files = data.get("files") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT and isinstance(files, dict)
            and all(isinstance(v, dict) for v in files.values())):
        return [f"{MANIFEST_FILE} is not an {MANIFEST_FORMAT} manifest"]
    present = set(_files(folder))
    problems = [f"missing file {rel}" for rel in sorted(set(files) - present)]
    problems += [f"extra file {rel} (not in the manifest)" for rel in sorted(present - set(files))]
    for rel in sorted(set(files) & present):
        want = files[rel]
        size = (folder / rel).stat().st_size
        if size != want.get("size"):
            problems.append(f"damaged file {rel}: {size} bytes, the manifest says {want.get('size')}")
        elif file_sha256(folder / rel) != want.get("sha256"):
            problems.append(f"damaged file {rel}: its sha256 differs from the manifest's")
    return problems


def verify_manifest(folder: str | os.PathLike) -> int:
    """Checks every file of `folder` against its manifest; returns how many files were checked.
    Raises `ManifestError` listing every missing, extra or damaged file."""
    problems = manifest_problems(folder)
    if problems:
        raise ManifestError(f"{folder}: {len(problems)} integrity problem(s):\n  " + "\n  ".join(problems))
    return len(_files(Path(folder)))

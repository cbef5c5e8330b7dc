"""One path layer for every checkpoint location: local paths, `file://` URLs and the remote
schemes `etils.epath` serves through fsspec (`gs://`, `s3://`, `az://`, `hf://`).

    as_path("runs/tiny")             -> a local path
    as_path("file:///data/ckpt")     -> the local path /data/ckpt
    as_path("gs://bucket/run")       -> an epath on Google Cloud Storage (needs gcsfs)

A scheme whose backend is not installed, or that epath does not know, is a ValueError naming
the scheme; never a local folder named `gs:` (what `pathlib.Path("gs://b/x")` silently makes).
"""

from __future__ import annotations

import importlib.util
import os
import re

from etils import epath

# scheme -> the Python modules that can serve it (any one installed suffices), the pip package.
REMOTE_SCHEMES: dict[str, tuple[tuple[str, ...], str]] = {
    "gs": (("gcsfs", "tensorflow"), "gcsfs"),
    "s3": (("s3fs",), "s3fs"),
    "az": (("adlfs",), "adlfs"),
    "hf": (("huggingface_hub",), "huggingface_hub"),
}
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
# What pathlib leaves of a URL: "gs://b/x" -> "gs:/b/x".
_COLLAPSED_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/[^/]")


def scheme_of(path: str | os.PathLike) -> str | None:
    """The URL scheme of `path` ("gs", "file", ...), or None for a plain path."""
    if isinstance(path, epath.Path) and not isinstance(path, epath.gpath.PosixGPath | epath.gpath.WindowsGPath):
        return None
    text = os.fspath(path)
    m = _URL.fullmatch(text)
    return m.group(1).lower() if m else None


def backend_available(scheme: str) -> bool:
    """Whether a module that serves remote `scheme` paths is installed."""
    modules, _ = REMOTE_SCHEMES[scheme]
    return any(importlib.util.find_spec(m) is not None for m in modules)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `etils.epath.Path` (see the module docstring); ValueError for an unknown
    scheme, a remote scheme whose backend is not installed, or a URL whose `//` was collapsed."""
    if isinstance(path, epath.Path) and not isinstance(path, epath.gpath.PosixGPath | epath.gpath.WindowsGPath):
        return path  # a resource path or another registered epath class
    text = os.fspath(path)
    m = _URL.fullmatch(text)
    if m is None:
        collapsed = _COLLAPSED_URL.match(text)
        if collapsed and collapsed.group(1).lower() in REMOTE_SCHEMES | {"file": None}:
            raise ValueError(f"{text}: looks like a {collapsed.group(1)}:// URL whose '//' was lost (a pathlib.Path "
                             "of a URL); pass the URL as a string")
        return epath.Path(text)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f"{text}: a file:// URL needs an absolute path (file:///dir/...)")
        return epath.Path(rest)
    if scheme not in REMOTE_SCHEMES:
        known = ", ".join(f"{s}://" for s in ("file", *REMOTE_SCHEMES))
        raise ValueError(f"{text}: unknown path scheme {scheme}://; use a local path or one of {known}")
    if not backend_available(scheme):
        package = REMOTE_SCHEMES[scheme][1]
        raise ValueError(f"{text}: {scheme}:// paths need the {package} package, which is not installed "
                         f"(pip install {package})")
    return epath.Path(f"{scheme}://{rest}")


def orbax_dir(path: str | os.PathLike) -> epath.Path:
    """The folder to hand Orbax: `as_path`, made absolute when local. Every Orbax call takes its
    folder from here, because Orbax reads no checkpoint metadata from a relative path (it then
    sees an empty checkpoint rather than an error)."""
    p = as_path(path)
    return p if is_remote(p) else p.absolute()


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names a remote (non-local) location."""
    return scheme_of(path) in REMOTE_SCHEMES


def local_path(path: str | os.PathLike, what: str = "this"):
    """`path` as a local `pathlib.Path` (file:// URLs included); ValueError naming `what` for a
    remote one (memory-mapped safetensors and tokenizer files are read from a local disk)."""
    import pathlib

    p = as_path(path)
    if is_remote(p):
        raise ValueError(f"{p}: {what} must be on a local (or mounted) file system, not {scheme_of(p)}://")
    return pathlib.Path(os.fspath(p))


def check_apart(out_dir: str | os.PathLike, sources: dict[str, str | os.PathLike | None]) -> None:
    """Raises ValueError when the output folder `out_dir` is one of the `sources` (name -> path),
    lies inside one or holds one: writing (with overwrite) would delete or pollute the source.
    Real paths are compared (symlinks resolved); remote paths are never local folders."""
    if is_remote(out_dir):
        return
    out = os.path.realpath(os.fspath(as_path(out_dir)))
    for name, src in sources.items():
        if src is None or is_remote(src):
            continue
        real = os.path.realpath(os.fspath(as_path(src)))
        if out == real:
            relation = "is"
        elif os.path.commonpath([out, real]) == real:
            relation = "is inside"
        elif os.path.commonpath([out, real]) == out:
            relation = "contains"
        else:
            continue
        raise ValueError(f"the output folder {out_dir} {relation} the {name} {src} (real paths {out} and {real}); "
                         "writing there would delete or change the source: choose another output folder")

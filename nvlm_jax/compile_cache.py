"""JAX's persistent compilation cache, on by default for the project's entry points.

The 72B train step compiles in minutes; a warm cache turns a restart's compile into a lookup.
Directory: the `dir` argument, else `$NVLM_JAX_CACHE_DIR`, else `~/.cache/nvlm_jax/xla`.
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nvlm_jax", "xla")


def enable_compilation_cache(dir: str | None = None, min_compile_secs: float = 0.5) -> str | None:
    """Turns the cache on and returns its directory; `dir=""` (or env value "off") turns it off."""
    path = dir if dir is not None else os.environ.get("NVLM_JAX_CACHE_DIR", DEFAULT_DIR)
    if path in ("", "off"):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path

"""Opt-in host memory reuse for XLA:CPU: freed memory stays in the process for the next call.

Why: XLA:CPU allocates a program's temporary buffer with `malloc` on every call and frees it
after. glibc serves a request above 32 MB, and any request from a thread whose arena cannot hold
it, with a fresh `mmap`, and `munmap`s it on free, so every call faults its whole temp buffer
back in page by page, the kernel zeroing each page. The 126M bench training step has a 4.7 GB
temp buffer: 1.1 M page faults a step, about a third of its wall time on this 2-core machine
(BUILD_NOTES, "Host memory reuse"). With one arena, no `mmap` and no trimming, the buffer is
carved from the heap and the next call reuses the same pages.

Why it is off by default: the process keeps its peak heap, and the heap fragments. Two programs
with multi-GB temporaries called in turn (LoRA and frozen steps alternated) grew RSS from 8.6 to
18.4 GB in four rounds, and each growth step faulted 1.2 M pages at ~25 us each (a 24 s step
instead of 8 s); one training program alone grew once too (peak RSS 14.8 GB against 8.3 GB),
for a 1.47x faster step in steady state. `NVLM_JAX_HOST_MALLOC=keep`
turns it on in the training entry points (`experiments/train.py`, `main_job.py`,
`lora_demo.py`) and the training benches; "system" (the default) leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV = "NVLM_JAX_HOST_MALLOC"


def keep_freed_memory() -> bool:
    """Tunes glibc's malloc so freed host memory is reused rather than unmapped; True if applied.

    Call it before JAX starts its backend (before the first computation or `jax.devices()`): the
    arena limit only binds threads that have not yet made their own arena. Acts only when
    `$NVLM_JAX_HOST_MALLOC` is "keep"; a no-op (False) otherwise, and off glibc.
    """
    mode = os.environ.get(ENV, "system")
    if mode not in ("keep", "system"):
        raise ValueError(f"${ENV} must be 'keep' or 'system', got {mode!r}")
    if mode == "system":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc (musl, macOS): their allocators have other knobs
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: a worker thread's large request then comes from the main heap instead of a
    # per-thread arena's mmap fallback. No mmap at all, and never give the heap's top back
    # (-1 is SIZE_MAX to glibc; the largest positive int, 2 GB, still trimmed a 4.7 GB temp).
    ok = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, -1)]
    return all(ok)

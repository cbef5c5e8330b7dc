"""Finds whole-KV-cache copies in a compiled decode step (tests that the cache is written in place)."""

import numpy as np

_HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def whole_cache_copies(compiled_hlo: str, cache_shape, dtype="float32") -> list[str]:
    """HLO lines that copy or broadcast an array of the whole cache's shape and dtype, or, for a
    16-bit cache, update an f32 copy of it (XLA:CPU's way with a bf16 dynamic-update-slice)."""
    dims = ",".join(map(str, cache_shape))
    full = f"{_HLO_TYPES[np.dtype(dtype).name]}[{dims}]"
    found = [line for line in compiled_hlo.splitlines()
             if f"= {full}" in line and (" copy(" in line or " broadcast(" in line)]
    if full != f"f32[{dims}]":
        found += [line for line in compiled_hlo.splitlines()
                  if f"= f32[{dims}]" in line and " dynamic-update-slice(" in line]
    return found

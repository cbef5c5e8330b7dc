"""Finds whole-KV-cache copies in a compiled decode step (tests that the cache is written in place)."""

import numpy as np

_HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def whole_cache_copies(compiled_hlo: str, cache_shape, dtype="float32") -> list[str]:
    """HLO lines that copy, broadcast or bitcast-convert an array of the whole cache's shape, or,
    for a 16-bit cache, update an f32 copy of it (XLA:CPU's way with a bf16 dynamic-update-slice).
    A 16-bit cache is held as its raw bits (u16): converting it to or from them inside a fusion
    turns the fusion's update into a pass over the whole buffer."""
    dims = ",".join(map(str, cache_shape))
    types = {_HLO_TYPES[np.dtype(dtype).name]}
    if np.dtype(dtype).itemsize == 2:
        types.add("u16")
    ops = (" copy(", " broadcast(", " bitcast-convert(")
    found = [line for line in compiled_hlo.splitlines()
             if any(f"= {t}[{dims}]" in line for t in types) and any(op in line for op in ops)]
    if types != {"f32"}:
        found += [line for line in compiled_hlo.splitlines()
                  if f"= f32[{dims}]" in line and " dynamic-update-slice(" in line]
    return found

"""Finds whole-KV-cache copies in a compiled decode step (tests that the cache is written in place)."""


def whole_cache_copies(compiled_hlo: str, cache_shape) -> list[str]:
    """HLO lines that copy or broadcast an f32 array of the whole cache's shape."""
    full = "f32[{}]".format(",".join(map(str, cache_shape)))
    return [line for line in compiled_hlo.splitlines()
            if f"= {full}" in line and (" copy(" in line or " broadcast(" in line)]

"""The environment of a test's subprocess: JAX on CPU, with the tests' compile flag.

Tests are compile-bound: XLA:CPU's LLVM backend at -O0 compiles ~25-30% faster (measured on
tests/models/test_nvlm.py: 143 -> 101 s) and changes no result a test checks (matmuls are library
calls; every bitwise comparison is between two programs built alike). Benches keep the default.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_env(devices: int | None = None, *, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """os.environ without `drop`, on CPU with `devices` simulated devices (None: one, as a
    plain run on this machine), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    flags = [FAST_COMPILE] + ([f"--xla_force_host_platform_device_count={devices}"] if devices else [])
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), **extra)
    return env

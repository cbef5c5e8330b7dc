"""`host_memory.keep_freed_memory`: a jitted program's temp memory is reused across calls."""

import json
import subprocess
import sys

import pytest

from nvlm_jax import host_memory
from tests.cpu_env import cpu_env

# Runs a program with 64 MB temporaries 12 times and prints the page faults of each call.
_PROGRAM = r"""
import json, resource, sys
from nvlm_jax import host_memory
applied = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
@jax.jit
def f(x):
    a = jnp.cumsum(jnp.sin(x), axis=0)  # temporaries XLA cannot fuse away
    return jnp.sum(jnp.cumsum(a[::-1] * x, axis=1))
jax.block_until_ready(f(x))
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _run(mode: str) -> dict:
    env = cpu_env(devices=1, NVLM_JAX_HOST_MALLOC=mode)
    env["XLA_FLAGS"] = ""  # XLA's default optimisation: the -O0 loops would take a minute here
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_kept_memory_is_reused_by_the_next_call_instead_of_faulted_in_again():
    system, keep = _run("system"), _run("keep")
    assert not system["applied"] and keep["applied"]
    # glibc's defaults: every call maps its 64 MB temporaries afresh (~50 k faults of 4 KiB).
    assert min(system["faults"]) > 10_000, system
    # Kept: calls reuse the heap's pages. Until the heap has grown to fit every call's layout a
    # call can still fault some in (seen: up to 4 of the first 8 calls), never all of them.
    assert min(keep["faults"]) < 1_000, keep
    assert sum(keep["faults"]) < sum(system["faults"]) / 2, (keep, system)


def test_an_unknown_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "jemalloc")
    with pytest.raises(ValueError, match="NVLM_JAX_HOST_MALLOC must be 'keep' or 'system', got 'jemalloc'"):
        host_memory.keep_freed_memory()


def test_glibc_is_left_alone_unless_asked(monkeypatch):
    monkeypatch.delenv(host_memory.ENV, raising=False)
    assert host_memory.keep_freed_memory() is False
    monkeypatch.setenv(host_memory.ENV, "system")
    assert host_memory.keep_freed_memory() is False

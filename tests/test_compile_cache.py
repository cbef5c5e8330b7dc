"""The persistent compilation cache writes entries and can be turned off."""

import os
import subprocess
import sys

from tests.cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import jax, jax.numpy as jnp
from nvlm_jax.compile_cache import enable_compilation_cache
path = enable_compilation_cache({dir!r}, min_compile_secs=0)
f = jax.jit(lambda x: jnp.sin(x) @ x.T + {salt})
f(jnp.ones((64, 64))).block_until_ready()
print(path)
"""


def _run(cache_dir, salt):
    env = cpu_env(PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(dir=cache_dir, salt=salt)], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_cache_dir_gets_entries(tmp_path):
    cache = str(tmp_path / "xla")
    assert _run(cache, 1) == cache
    assert os.listdir(cache), "a compiled program should be cached"


def test_off_disables_the_cache(tmp_path):
    assert _run("off", 2) == "None"

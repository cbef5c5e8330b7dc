"""Test setup: the repo on sys.path, then 8 simulated CPU devices compiled at -O0 (`tests/cpu_env.py`),
set before jax is imported."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.cpu_env import FAST_COMPILE  # noqa: E402 - why tests compile at -O0

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch; keep XLA's f32 matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Files holding slow (end-to-end) tests run first. `--dist loadfile` hands files to the two
    workers in collection order (`--no-loadscope-reorder` in pyproject keeps it; xdist's default
    puts files with the most tests first, which left the few long end-to-end files for last and
    one worker running them alone for minutes at the end of CI)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: files stay whole and in order

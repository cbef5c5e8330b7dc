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

"""Test setup: 8 simulated CPU devices (set before jax is imported) and the repo on sys.path."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch; keep XLA's f32 matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")

"""The compiled kernel forms lower for their hardware from this CPU-only machine.

`jit(...).lower(lowering_platforms=...)` runs the whole Pallas lowering (Pallas -> Triton IR for
GPUs, Pallas -> Mosaic for TPUs), including its checks of block shapes, dtypes and supported
ops, without a device; what remains unproven here is the backend compilers (Triton -> PTX,
Mosaic -> TPU code) and the numbers, which need the hardware. Mosaic's lowering asks which TPU
generation it targets: an abstract mesh names one (TPU v5p).
"""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src import mesh as mesh_lib

from kernels import tile_attention as ta

TARGETS = {"mosaic": ("tpu", "tpu_custom_call"), "triton": ("cuda", "__gpu$xla.gpu.triton")}


def _bench_cases():
    path = pathlib.Path(__file__).parents[2] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention_cases", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.cases(smoke=False)


CASES = _bench_cases()  # the full-size NVLM shapes bench/attention.py times on hardware


def _target(backend: str, tpu_kind: str = "TPU v5p"):
    """The abstract mesh lowering runs under: Mosaic reads the TPU generation (and its VMEM size,
    which the dispatcher's VMEM check uses too) from it."""
    tpu = mesh_lib.AbstractDevice(device_kind=tpu_kind, num_cores=1, platform="tpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=tpu if backend == "mosaic" else None))


def _lowered_calls(fn, args, backend: str) -> list[str]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(TARGETS[backend][0],)).as_text()
    return re.findall(r"custom_call @([\w$.]+)", text)


@pytest.mark.parametrize("backend", sorted(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_lower_for_the_hardware(case, backend):
    name, b, s, t, heads, kv_heads, d, scale, mask = case
    q = jax.ShapeDtypeStruct((b, s, heads, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, kv_heads, d), jnp.bfloat16)

    def forward(q, k, v):
        return ta.tile_attention(q, k, v, mask, scale=scale, backend=backend, interpret=False)

    def loss(q, k, v):
        return forward(q, k, v).astype(jnp.float32).sum()

    kernel_call = TARGETS[backend][1]
    with _target(backend):
        assert ta.unsupported_reason(q.shape, kv.shape, kv.shape, q.dtype, mask, backend=backend,
                                     interpret=False) is None
        assert _lowered_calls(forward, (q, kv, kv), backend) == [kernel_call]
        # Backward: the forward (for the log-sum-exp) and the dq and dk/dv kernels, nothing else.
        assert _lowered_calls(jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv), backend) == [kernel_call] * 3


def test_small_vmem_tpu_refuses_the_long_decoder_case():
    """TPU v4 has 16 MiB of VMEM per core: the 3,200-token decoder case does not fit the kernel's
    VMEM plan, so the dispatcher falls back to XLA there, with this reason."""
    name, b, s, t, heads, kv_heads, d, scale, mask = CASES[1]
    assert name.startswith("decoder")
    with _target("mosaic", "TPU v4"):
        reason = ta.unsupported_reason((b, s, heads, d), (b, t, kv_heads, d), (b, t, kv_heads, d), jnp.bfloat16,
                                       mask, backend="mosaic", interpret=False)
    assert reason is not None and "VMEM" in reason


def test_interpret_mode_lowers_to_no_kernel_call():
    """The check above can fail: the CPU interpreter form has no kernel custom call at all."""
    name, b, s, t, heads, kv_heads, d, scale, mask = CASES[0]
    q = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)

    def forward(q, k, v):
        return ta.tile_attention(q, k, v, mask.__class__(), scale=1.0, backend="triton", interpret=True)

    text = jax.jit(forward).trace(q, q, q).lower().as_text()
    assert "custom_call @__gpu" not in text and "tpu_custom_call" not in text

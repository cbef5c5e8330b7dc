"""`kernels.tile_attention` in Pallas interpret mode on CPU against the oracle: forward, dq/dk/dv.

Tolerances (max abs error; inputs ~N(0, 1), head_dim 16, scale 0.3 or 1):
- float32 against the float32 oracle: output 2e-5, gradients 1e-4 (observed <= 1e-6).
- bfloat16 against the float32 oracle run on the same bf16 inputs: output 2e-2, gradients
  2e-2 x max|grad| (observed 7.8e-3 = one bf16 ulp at |x| in [1, 2), and <= 6e-3 relative, the
  same as the bf16 XLA path's own error: both round scores, probabilities and outputs to bf16);
  and the bf16 kernel against the bf16 XLA path: output 2e-2 (observed one ulp).
Each case is one jit of forward + backward, so each costs one interpret-mode compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import masks
from kernels.reference import attention_reference
from kernels.tile_attention import BlockSizes, mask_blocks, tile_attention, unsupported_reason
from nvlm_jax.models.attention import MaskSpec, attention
from tests.kernels.test_masks import MASK_CASES, make_mask

TOL = {jnp.float32: dict(out=2e-5, grad=1e-4), jnp.bfloat16: dict(out=2e-2, grad=2e-2)}


def _qkv(b, s, t, h, kvh, d, dtype, seed):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k1, (b, s, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(k2, (b, t, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(k3, (b, t, kvh, d), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(k4, (b, s, h, d), jnp.float32)
    return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
    """fn's output and the gradients of <fn(q, k, v), cotangent> in one jitted computation."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def _check(case, *, b=2, s=37, t=37, h=4, kvh=2, d=16, dtype=jnp.float32, blocks=(16, 16), backend="triton",
           scale=0.3, seed=0, interpret=True):
    q, k, v, cot = _qkv(b, s, t, h, kvh, d, dtype, seed)
    spec = make_mask(case, b, s, t, seed=seed)
    kernel = lambda q, k, v: tile_attention(q, k, v, spec, scale=scale,  # noqa: E731
                                            block_sizes=BlockSizes(*blocks), backend=backend, interpret=interpret)
    out, grads = _value_and_grads(kernel, q, k, v, cot)
    want, want_grads = _value_and_grads(lambda q, k, v: attention_reference(q, k, v, spec, scale=scale), q, k, v, cot)
    tol = TOL[dtype]
    np.testing.assert_allclose(out, want, atol=tol["out"], rtol=0)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        limit = tol["grad"] * (1.0 if dtype == jnp.float32 else max(1.0, np.abs(ref).max()))
        assert np.abs(got - ref).max() <= limit, f"{name}: max error {np.abs(got - ref).max()} > {limit}"
    dense = spec.dense(b, s, t)
    if dense is not None:  # rows that see nothing: exactly zero output and dq
        empty = ~np.asarray(dense).any(-1)
        np.testing.assert_array_equal(out[empty], 0.0)
        np.testing.assert_array_equal(grads[0][empty], 0.0)
    return q, k, v, spec, out


# One case per mask type of the model's call sites, lengths not multiple of the blocks.
@pytest.mark.parametrize("case, shape", [
    ("none", dict(s=37, t=37, h=2, kvh=2)),  # ViT: bidirectional, MHA, 37 = 2 x 16 + 5
    ("packed", dict(s=37, t=37, h=4, kvh=1)),  # decoder: causal packed docs + padding, GQA 4
    ("cache", dict(s=5, t=37, h=4, kvh=2, blocks=(8, 16))),  # decode into a KV cache, GQA 2
    ("segments", dict(s=21, t=27, h=3, kvh=1, blocks=(8, 8))),  # rows that see nothing, GQA 3
    ("cross", dict(s=29, t=24, h=4, kvh=2, blocks=(8, 8))),  # NVLM-X/H tile rule, padded tiles
    ("causal", dict(s=19, t=19, h=2, kvh=1, blocks=(8, 16), scale=1.0)),  # plain causal
])
def test_float32_matches_the_oracle(case, shape):
    _check(case, **shape)


@pytest.mark.parametrize("case", ["packed", "cross"])
def test_bfloat16_matches_the_oracle_and_the_xla_path(case):
    t = 24 if case == "cross" else 37
    q, k, v, spec, out = _check(case, s=37 if case == "packed" else 29, t=t, dtype=jnp.bfloat16)
    xla = jax.jit(lambda q, k, v: attention(q, k, v, spec, scale=0.3))(q, k, v)
    np.testing.assert_allclose(out, np.asarray(xla, np.float32), atol=TOL[jnp.bfloat16]["out"], rtol=0)


def test_mosaic_form_matches_the_oracle():
    # The TPU form (block lists as scalar-prefetch operands) in interpret mode.
    _check("cross", s=29, t=24, blocks=(8, 8), backend="mosaic")
    _check("packed", s=37, t=37, h=4, kvh=2, blocks=(16, 16), backend="mosaic", seed=1)


@pytest.mark.slow
def test_mosaic_form_under_the_tpu_interpreter():
    # Pallas' TPU-semantics interpreter (scalar prefetch in SMEM, VMEM blocks, out-of-bounds
    # reads raise, races detected): closer to Mosaic than the generic interpreter.
    from jax.experimental.pallas import tpu as pltpu

    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")
    _check("cross", s=29, t=24, blocks=(8, 8), backend="mosaic", interpret=params)


@pytest.mark.parametrize("seed", [7, 21])  # cross with GQA 4 and 32-blocks; causal with s != t
def test_random_shapes_blocks_and_masks(seed):
    rng = np.random.default_rng(seed)
    case = MASK_CASES[int(rng.integers(len(MASK_CASES)))]
    kvh, group = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4]))
    s = int(rng.integers(3, 45))
    t = 8 * int(rng.integers(1, 5)) if case == "cross" else (s if case == "packed" else int(rng.integers(s, 50)))
    blocks = (int(rng.choice([8, 16, 32])), int(rng.choice([8, 16, 32])))
    _check(case, b=int(rng.integers(1, 3)), s=s, t=t, h=kvh * group, kvh=kvh, d=int(rng.choice([8, 16])),
           blocks=blocks, seed=seed)


def test_skipped_blocks_are_never_read():
    # NaN in the values of one key block: query blocks whose list holds that block turn NaN
    # (0 x NaN inside P.V, even where masked), every other query block is untouched. So blocks
    # of kind 0 are really skipped, and the test would see it if they were not.
    b, s, h, d, blk = 1, 64, 2, 16, 16
    q, k, v, _ = _qkv(b, s, s, h, h, d, jnp.float32, seed=5)
    seg = jnp.asarray([[1] * 24 + [2] * 24 + [3] * 16])
    pos = jnp.asarray([list(range(24)) + list(range(24)) + list(range(16))])
    spec = MaskSpec(causal=True, causal_by_index=True, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                    kv_positions=pos)
    kinds = np.asarray(mask_blocks(spec, b, s, s, BlockSizes(blk, blk)))[0]
    poisoned = 1  # key block 16..31: partly segment 1, partly segment 2
    run = jax.jit(lambda v: tile_attention(q, k, v, spec, scale=0.3, block_sizes=BlockSizes(blk, blk), interpret=True))
    clean = np.asarray(run(v))
    dirty = np.asarray(run(v.at[:, poisoned * blk:(poisoned + 1) * blk].set(jnp.nan)))
    for qb in range(s // blk):
        rows = slice(qb * blk, (qb + 1) * blk)
        if kinds[qb, poisoned] == 0:
            np.testing.assert_array_equal(dirty[:, rows], clean[:, rows])
        else:
            assert np.isnan(dirty[:, rows]).all()
    np.testing.assert_array_equal(kinds[:, poisoned], [0, 1, 1, 0])  # block 0: causal; block 3: segment 3
    assert masks.skipped_fraction(jnp.asarray(kinds)) == 10 / 16


def test_unsupported_shapes_have_reasons():
    assert unsupported_reason((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 3, 16), jnp.float32, MaskSpec()) is not None
    assert "Triton" in unsupported_reason((1, 8, 4, 24), (1, 8, 2, 24), (1, 8, 2, 24), jnp.bfloat16, MaskSpec(),
                                          backend="triton", interpret=False)
    assert "dtype" in unsupported_reason((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), jnp.int32, MaskSpec())
    assert unsupported_reason((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16), jnp.bfloat16, MaskSpec()) is None
    with pytest.raises(ValueError, match="backend"):
        tile_attention(*_qkv(1, 8, 8, 2, 1, 16, jnp.float32, 0)[:3], MaskSpec(), scale=1.0, backend="cuda")


@pytest.mark.slow
def test_vit_tile_length_at_default_blocks():
    # 1025 tokens (1024 patches + CLS) with the default 128-blocks: 9 x 9 blocks, last key block masked.
    _check("none", b=1, s=1025, t=1025, h=1, kvh=1, d=16, blocks=(128, 128), scale=1.0)


@pytest.mark.slow
def test_bench_cpu_smoke_runs(monkeypatch, capsys):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).parents[2] / "bench" / "attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["attention.py", "--cpu-smoke"])
    bench.main()
    out = capsys.readouterr().out
    assert out.count("of blocks skipped") == 3
    pallas_rows = [line.split() for line in out.splitlines() if line.strip().startswith("pallas")]
    assert len(pallas_rows) == 3 and all(len(r) == 3 for r in pallas_rows), out  # two timings each, no n/a

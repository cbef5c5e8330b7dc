"""Flash attention over a mask description, as Pallas kernels (forward, dq, dk/dv).

`tile_attention(q, k, v, mask, scale=...)` computes the same function as
`nvlm_jax.models.attention.attention` (GQA, segment ids / positions / causal, the NVLM-X/H
tile rule, rows that see nothing give 0) without a dense mask:

- Mask: `kernels.masks` packs the ids into int32 arrays and derives a block map (0 skip,
  1 element mask, 2 fully visible) from per-block min/max summaries. Each kernel program loops
  only over the non-empty blocks of its row (compacted lists), and evaluates the element predicate
  `masks.visible` only in blocks of kind 1.
- Layout: q/k/v are transposed to head-major [batch, heads, len, d] and zero-padded to whole
  blocks; ids are padded by repeating the last token and the key-length rule hides padded keys,
  so any length works (1025 ViT tokens with 128-blocks: 9 key blocks, the last one masked).
- GQA: a program for query head h reads kv head h // (heads // kv_heads) through its BlockSpec
  index map; repeated K/V are never built. The dk/dv program of a kv head loops over its group
  of query heads and accumulates in registers/VMEM, so no per-query-head partial gradients
  are materialised either.
- Forward: grid (batch * heads, q_blocks); online softmax over the listed KV blocks with a
  running max and sum in f32; saves the log-sum-exp (+inf for rows that see nothing).
- Backward (`jax.custom_vjp`): delta = rowsum(dO * O) in plain JAX, then a dq kernel (grid
  (batch * heads, q_blocks), loop over KV blocks) and a dk/dv kernel (grid (batch * kv_heads,
  kv_blocks), loop over the group's query heads and the listed Q blocks, computed in the
  transposed [kv, q] orientation so the per-query lse/delta are rows). Probabilities are
  recomputed from the saved lse; masked entries are exactly 0, so empty rows get zero gradients.

Numerics: scores q·k are accumulated in f32, rounded to the input dtype (as the XLA path and the
reference models' bf16 matmul do), then scaled in f32; softmax statistics are f32; probabilities
are rounded to the value dtype before the P·V product (f32 accumulation); the output is
normalised in f32 and rounded once. The XLA path normalises against the global row max, the
kernel against a running max, so bf16 results differ from it in the last bits of the rounded
probabilities; f32 results agree to ~1e-6. f32 inputs use HIGHEST matmul precision. For the
ViT, q is pre-scaled and `scale=1.0` (identical math); in the backward, dS is rounded to the
input dtype before the dS·K and dSᵀ·Q products (standard flash-attention practice).

Backends: the three kernel bodies are shared. `backend="triton"` (Pallas GPU, Triton lowering)
passes the block lists as ordinary whole-array inputs; `backend="mosaic"` (TPU) passes them as
scalar-prefetch operands (SMEM) through `pltpu.PrefetchScalarGridSpec`. On CPU the "triton"
form runs with `interpret=True`; both forms are tested in interpret mode. The compiled forms
are lowered from the CPU for their hardware in tests/kernels/test_cross_lowering.py (forward and
backward, the full-size NVLM shapes: Pallas -> Triton IR for CUDA, Pallas -> Mosaic for a TPU
v5p), but have NOT been compiled or run on an accelerator (none was available when this was
written): the Triton/Mosaic backend compilers and the numbers there are unproven.
On Mosaic the dk/dv kernel keeps q and dO of a whole kv-head group resident in VMEM; shapes whose
estimate exceeds 3/4 of VMEM (e.g. 8 query heads per kv head x 3,200 tokens x 128 in bf16 needs
~28 MiB, over a 16 MiB TPU v4 core's budget but within a v5p's) are reported by
`unsupported_reason`, and the dispatcher then uses XLA.
Under a multi-device mesh the pallas_call has no partitioning rule (operands are gathered): the
dispatcher in `nvlm_jax.models.attention` keeps "auto" on XLA there and warns for "pallas".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import masks

BACKENDS = ("triton", "mosaic")
_NEG = -1e30  # initial running max: finite, so exp(m_old - m_new) never sees inf - inf


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key block lengths (shared by the forward and both backward kernels)."""

    block_q: int
    block_k: int


DEFAULT_BLOCKS = {
    # Triton: 64x64 keeps the f32 score block and the [64, d<=128] accumulator in registers.
    "triton": BlockSizes(64, 64),
    # Mosaic: 128 lanes per vreg; 128x128 fills the MXU on all current TPUs.
    "mosaic": BlockSizes(128, 128),
    # Interpret mode on CPU: each loop step is a few XLA ops, so fewer, larger blocks are faster.
    "interpret": BlockSizes(128, 128),
}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it is a custom_vjp non-diff argument)."""

    layout: masks.MaskLayout
    backend: str
    interpret: Any  # bool, or a pltpu.InterpretParams (TPU-semantics interpreter, Mosaic form)
    scale: float
    block_q: int
    block_k: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    q_pad: int
    kv_pad: int

    @property
    def nq(self) -> int:
        return self.q_pad // self.block_q

    @property
    def nk(self) -> int:
        return self.kv_pad // self.block_k

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def default_backend() -> tuple[str, bool]:
    """(backend, interpret) for the default JAX platform: GPU → Triton, TPU → Mosaic, else
    the Triton form in interpret mode (Pallas compiles nothing for CPU)."""
    platform = jax.default_backend()
    if platform == "gpu":
        return "triton", False
    if platform == "tpu":
        return "mosaic", False
    return "triton", True


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _fit_blocks(blocks: BlockSizes, q_len: int, kv_len: int, backend: str, interpret: bool) -> BlockSizes:
    """Shrinks blocks for short sequences (never below what the backend can tile) and checks them."""
    if interpret:
        min_q = min_k = 8
    elif backend == "triton":
        min_q = min_k = 16  # tl.dot needs every matmul dimension >= 16
    else:
        min_q, min_k = 8, 128  # sublane-aligned query rows, lane-dense score columns
    bq = min(blocks.block_q, max(min_q, pl.next_power_of_2(q_len)))
    bk = min(blocks.block_k, max(min_k, pl.next_power_of_2(kv_len)))
    for name, size in (("block_q", bq), ("block_k", bk)):
        if size <= 0 or size % 8:
            raise ValueError(f"{name}={size} must be a positive multiple of 8")
        if backend == "triton" and not interpret and (size & (size - 1) or size < 16):
            raise ValueError(f"{name}={size}: the Triton backend needs a power of two >= 16")
    return BlockSizes(bq, bk)


def _mosaic_vmem_bytes(cfg: _Config, itemsize: int) -> int:
    """Rough VMEM need of the largest kernel (double-buffered blocks), for the Mosaic backend."""
    d, g, f = cfg.head_dim, cfg.group, len(cfg.layout.fields)
    lane = lambda n: _round_up(max(n, 1), 128)  # noqa: E731  (minor dims are padded to 128 lanes)
    fwd = (2 * cfg.block_q * lane(d) + 2 * cfg.kv_pad * lane(d)) * itemsize
    fwd += (cfg.block_q * 128 + cfg.nk * _round_up(f, 8) * lane(cfg.block_k)) * 4
    dq = fwd + 2 * cfg.block_q * lane(d) * itemsize + 2 * cfg.block_q * 128 * 4
    dkv = (2 * g * cfg.q_pad * lane(d) + 4 * cfg.block_k * lane(d)) * itemsize + (
        2 * g * cfg.nq * 8 * lane(cfg.block_q) + cfg.nq * _round_up(f, 8) * lane(cfg.block_q) + cfg.block_k * 128) * 4
    return 2 * max(fwd, dq, dkv)


_SMALLEST_VMEM = 16 * 2**20  # TPU v4's VMEM per core (JAX's tpu_info), the smallest of current chips


def _mosaic_vmem_capacity() -> int:
    try:
        from jax.experimental.pallas import tpu as pltpu

        return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    except Exception:  # not on a TPU, or a chip this jax does not know: assume the smallest
        return _SMALLEST_VMEM


def _mosaic_vmem_budget() -> int:
    """What the kernels may plan to use: 3/4 of VMEM, leaving room for Mosaic's own scratch."""
    return _mosaic_vmem_capacity() * 3 // 4


def unsupported_reason(q_shape, k_shape, v_shape, dtype, mask, *, backend: str | None = None,
                       interpret: bool | None = None, block_sizes: BlockSizes | None = None) -> str | None:
    """Why `tile_attention` cannot run these shapes here (None when it can)."""
    if backend is None:
        backend, default_interpret = default_backend()
        interpret = default_interpret if interpret is None else interpret
    interpret = bool(jax.default_backend() == "cpu" if interpret is None else interpret)
    if len(q_shape) != 4 or len(k_shape) != 4 or tuple(k_shape) != tuple(v_shape):
        return f"expects q [b, s, h, d] and equal k/v [b, t, kvh, d]; got {q_shape}, {k_shape}, {v_shape}"
    b, s, h, d = q_shape
    if k_shape[0] != b or k_shape[3] != d:
        return f"k/v {k_shape} do not match q {q_shape} in batch or head_dim"
    if h % k_shape[2]:
        return f"query heads {h} are not a multiple of kv heads {k_shape[2]}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} is not a float32/bfloat16/float16"
    if s == 0 or k_shape[1] == 0:
        return "empty sequence"
    if not interpret and backend == "triton" and (d & (d - 1) or d < 16):
        return f"head_dim {d}: Triton needs a power of two >= 16"
    if not interpret and backend == "mosaic":
        blocks = _fit_blocks(block_sizes or DEFAULT_BLOCKS[backend], s, k_shape[1], backend, interpret)
        cfg = _config(mask, q_shape, k_shape, 1.0, blocks, backend, interpret)
        need, budget = _mosaic_vmem_bytes(cfg, jnp.dtype(dtype).itemsize), _mosaic_vmem_budget()
        if need > budget:
            return f"needs ~{need >> 20} MiB of VMEM (budget {budget >> 20} MiB)"
    return None


def _config(mask, q_shape, k_shape, scale, blocks: BlockSizes, backend, interpret) -> _Config:
    b, s, h, d = q_shape
    t, kvh = k_shape[1], k_shape[2]
    return _Config(
        layout=masks.MaskLayout.from_spec(mask, s, t), backend=backend, interpret=interpret, scale=float(scale),
        block_q=blocks.block_q, block_k=blocks.block_k, batch=b, heads=h, kv_heads=kvh, head_dim=d,
        q_pad=_round_up(s, blocks.block_q), kv_pad=_round_up(t, blocks.block_k),
    )


def effective_blocks(q_len: int, kv_len: int, *, backend: str | None = None, interpret: bool | None = None,
                     block_sizes: BlockSizes | None = None) -> BlockSizes:
    """The block sizes `tile_attention` uses for these lengths (defaults fitted to short sequences)."""
    return _resolve(backend, interpret, block_sizes, q_len, kv_len)[2]


def _resolve(backend, interpret, block_sizes, q_len, kv_len):
    if backend is None:
        backend, default_interpret = default_backend()
        interpret = default_interpret if interpret is None else interpret
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    if block_sizes is None:
        block_sizes = DEFAULT_BLOCKS["interpret" if interpret else backend]
    return backend, interpret, _fit_blocks(block_sizes, q_len, kv_len, backend, interpret)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def mask_blocks(mask, batch: int, q_len: int, kv_len: int, block_sizes: BlockSizes) -> jax.Array:
    """The block map [batch, q_blocks, kv_blocks] (0 skip, 1 partial, 2 full) for these blocks,
    exactly as `tile_attention` computes it (block sizes are used as given)."""
    layout = masks.MaskLayout.from_spec(mask, q_len, kv_len)
    q_pad, kv_pad = _round_up(q_len, block_sizes.block_q), _round_up(kv_len, block_sizes.block_k)
    q_ids, kv_ids = masks.pack_ids(mask, layout, batch, q_pad, kv_pad)
    return masks.block_map(layout, q_ids, kv_ids, block_sizes.block_q, block_sizes.block_k)


# ---- kernel bodies (shared by both backends) --------------------------------------------------


def _precision(dtype):
    # f32 inputs are for parity runs: ask for exact f32 products (IEEE on Triton, not TF32).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, precision):
    """a [m, k] · b [k, n] → f32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _dot_nt(a, b, precision):
    """a [m, k] · b[n, k]ᵀ → f32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _scores(cfg: _Config, a, b):
    """Scaled scores a·bᵀ in f32, rounded to the input dtype first (see module numerics)."""
    raw = _dot_nt(a, b, _precision(a.dtype))
    return raw.astype(a.dtype).astype(jnp.float32) * cfg.scale


def _fields(read, names):
    return {name: read(i) for i, name in enumerate(names)}


def _masked(kind, s, predicate):
    """`s` with invisible entries at -inf, evaluating the predicate only in partial blocks."""
    return lax.cond(kind == 1, lambda s: jnp.where(predicate(), s, -jnp.inf), lambda s: s, s)


def _forward_kernel(kv_list_ref, kv_kind_ref, kv_count_ref, q_ids_ref, kv_ids_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, cfg: _Config):
    # q_ids_ref [bq, F]; kv_ids_ref [nk, F, bk]; q_ref [bq, d]; k_ref, v_ref [kv_pad, d];
    # o_ref [bq, d]; lse_ref [bq, 1]; the lists are flat [batch * nq * nk] (counts [batch * nq]).
    bh, qi = pl.program_id(0), pl.program_id(1)
    bq, bk, names = cfg.block_q, cfg.block_k, cfg.layout.fields
    row = (bh // cfg.heads) * cfg.nq + qi
    q = q_ref[...]
    q_fields = _fields(lambda i: q_ids_ref[:, i:i + 1], names)  # each [bq, 1]
    q_index = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def step(j, carry):
        acc, m, total = carry
        slot = row * cfg.nk + j
        kb = kv_list_ref[slot]
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]

        def predicate():
            kv_fields = _fields(lambda i: kv_ids_ref[kb, i:i + 1, :], names)  # each [1, bk]
            kv_index = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            return masks.visible(cfg.layout, q_fields, kv_fields, q_index, kv_index)

        s = _masked(kv_kind_ref[slot], _scores(cfg, q, k), predicate)  # [bq, bk]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)  # masked entries: exp(-inf) = 0
        total = alpha * total + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, _precision(v.dtype))
        return acc, m_new, total

    init = (jnp.zeros((bq, cfg.head_dim), jnp.float32), jnp.full((bq, 1), _NEG, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, total = lax.fori_loop(0, kv_count_ref[row], step, init)
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    o_ref[...] = (acc * jnp.where(seen, 1.0 / safe_total, 0.0)).astype(o_ref.dtype)
    # +inf for rows that see nothing: the backward's exp(s - lse) is then 0 everywhere.
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), jnp.inf)


def _dq_kernel(kv_list_ref, kv_kind_ref, kv_count_ref, q_ids_ref, kv_ids_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    # As the forward, plus do_ref [bq, d], lse_ref/delta_ref [bq, 1]; writes dq_ref [bq, d].
    bh, qi = pl.program_id(0), pl.program_id(1)
    bq, bk, names = cfg.block_q, cfg.block_k, cfg.layout.fields
    row = (bh // cfg.heads) * cfg.nq + qi
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_fields = _fields(lambda i: q_ids_ref[:, i:i + 1], names)
    q_index = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)

    def step(j, dq):
        slot = row * cfg.nk + j
        kb = kv_list_ref[slot]
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]

        def predicate():
            kv_fields = _fields(lambda i: kv_ids_ref[kb, i:i + 1, :], names)
            kv_index = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            return masks.visible(cfg.layout, q_fields, kv_fields, q_index, kv_index)

        s = _masked(kv_kind_ref[slot], _scores(cfg, q, k), predicate)
        p = jnp.exp(s - lse)  # [bq, bk]
        ds = p * (_dot_nt(do, v, _precision(v.dtype)) - delta)
        return dq + _dot(ds.astype(k.dtype), k, _precision(k.dtype))

    dq = lax.fori_loop(0, kv_count_ref[row], step, jnp.zeros((bq, cfg.head_dim), jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_list_ref, q_kind_ref, q_count_ref, q_ids_ref, kv_ids_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
    # One kv head and one key block. q_ids_ref [nq, F, bq]; kv_ids_ref [bk, F];
    # q_ref, do_ref [group, q_pad, d] (the query heads of this kv head); k_ref, v_ref [bk, d];
    # lse_ref, delta_ref [group, nq, 1, bq]; lists flat [batch * nk * nq] (counts [batch * nk]).
    # Everything is computed in the [key, query] orientation so per-query values are rows.
    bkv, kj = pl.program_id(0), pl.program_id(1)
    bq, bk, names = cfg.block_q, cfg.block_k, cfg.layout.fields
    row = (bkv // cfg.kv_heads) * cfg.nk + kj
    k, v = k_ref[...], v_ref[...]
    kv_fields = _fields(lambda i: kv_ids_ref[:, i:i + 1], names)  # each [bk, 1]
    kv_index = kj * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    count = q_count_ref[row]

    def head(gi, carry):
        def step(j, carry):
            dk, dv = carry
            slot = row * cfg.nq + j
            qb = q_list_ref[slot]
            start = pl.multiple_of(qb * bq, bq)
            q = q_ref[gi, pl.ds(start, bq), :]
            do = do_ref[gi, pl.ds(start, bq), :]
            lse, delta = lse_ref[gi, qb], delta_ref[gi, qb]  # [1, bq]

            def predicate():
                q_fields = _fields(lambda i: q_ids_ref[qb, i:i + 1, :], names)  # each [1, bq]
                q_index = start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
                return masks.visible(cfg.layout, q_fields, kv_fields, q_index, kv_index)

            s = _masked(q_kind_ref[slot], _scores(cfg, k, q), predicate)  # [bk, bq]
            p = jnp.exp(s - lse)
            dv = dv + _dot(p.astype(do.dtype), do, _precision(do.dtype))
            ds = p * (_dot_nt(v, do, _precision(v.dtype)) - delta)
            dk = dk + _dot(ds.astype(q.dtype), q, _precision(q.dtype))
            return dk, dv

        return lax.fori_loop(0, count, step, carry)

    zeros = jnp.zeros((bk, cfg.head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---- pallas_call plumbing ---------------------------------------------------------------------


def _call(cfg: _Config, kernel, name, grid, tables, in_specs, inputs, out_specs, out_shape):
    """Runs `kernel` with the int32 `tables` first: scalar prefetch on Mosaic, whole-array inputs
    on Triton. Index maps take `*_` so they accept Mosaic's trailing prefetch refs."""
    kernel = functools.partial(kernel, cfg=cfg)
    if cfg.backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu

        itemsize = max(x.dtype.itemsize for x in inputs if jnp.issubdtype(x.dtype, jnp.floating))
        # unsupported_reason keeps the estimate under 3/4 of VMEM, so this stays under capacity.
        limit = min(max(_mosaic_vmem_bytes(cfg, itemsize) * 5 // 4, _SMALLEST_VMEM), _mosaic_vmem_capacity())
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(tables), grid=grid, in_specs=in_specs, out_specs=out_specs)
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=limit)
        call = pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=params,
                              interpret=cfg.interpret, name=name)
    else:
        from jax.experimental.pallas import triton as plgpu

        table_specs = [pl.BlockSpec(t.shape, lambda *_: (0,)) for t in tables]
        params = plgpu.CompilerParams(num_warps=4 if cfg.head_dim <= 64 else 8, num_stages=2)
        call = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=table_specs + in_specs,
                              out_specs=out_specs, compiler_params=params, interpret=cfg.interpret, name=name)
    return call(*tables, *inputs)


def _q_row_specs(cfg: _Config):
    """BlockSpecs for programs over (batch * heads, q_blocks)."""
    h, g, bq, bk, d, f = cfg.heads, cfg.group, cfg.block_q, cfg.block_k, cfg.head_dim, len(cfg.layout.fields)
    return dict(
        q=pl.BlockSpec((None, None, bq, d), lambda bh, i, *_: (bh // h, bh % h, i, 0)),
        kv=pl.BlockSpec((None, None, cfg.kv_pad, d), lambda bh, i, *_: (bh // h, bh % h // g, 0, 0)),
        q_ids=pl.BlockSpec((None, bq, f), lambda bh, i, *_: (bh // h, i, 0)),
        kv_ids=pl.BlockSpec((None, cfg.nk, f, bk), lambda bh, i, *_: (bh // h, 0, 0, 0)),
        stat=pl.BlockSpec((None, None, bq, 1), lambda bh, i, *_: (bh // h, bh % h, i, 0)),
    )


def _forward(cfg: _Config, q, k, v, aux):
    sp = _q_row_specs(cfg)
    b, h = cfg.batch, cfg.heads
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, cfg.q_pad, 1), jnp.float32))
    return _call(cfg, _forward_kernel, "tile_attention_fwd", (b * h, cfg.nq), aux["kv_lists"],
                 [sp["q_ids"], sp["kv_ids"], sp["q"], sp["kv"], sp["kv"]],
                 [aux["q_ids"], aux["kv_ids_blocked"], q, k, v], [sp["q"], sp["stat"]], out_shape)


def _dq(cfg: _Config, q, k, v, do, lse, delta, aux):
    sp = _q_row_specs(cfg)
    return _call(cfg, _dq_kernel, "tile_attention_dq", (cfg.batch * cfg.heads, cfg.nq), aux["kv_lists"],
                 [sp["q_ids"], sp["kv_ids"], sp["q"], sp["kv"], sp["kv"], sp["q"], sp["stat"], sp["stat"]],
                 [aux["q_ids"], aux["kv_ids_blocked"], q, k, v, do, lse, delta], sp["q"],
                 jax.ShapeDtypeStruct(q.shape, q.dtype))


def _dkv(cfg: _Config, q, k, v, do, lse, delta, aux):
    kvh, g, bq, bk, d, f = cfg.kv_heads, cfg.group, cfg.block_q, cfg.block_k, cfg.head_dim, len(cfg.layout.fields)
    b, nq = cfg.batch, cfg.nq
    group = pl.BlockSpec((None, g, cfg.q_pad, d), lambda bk_, j, *_: (bk_ // kvh, bk_ % kvh, 0, 0))
    stat_rows = pl.BlockSpec((None, g, nq, 1, bq), lambda bk_, j, *_: (bk_ // kvh, bk_ % kvh, 0, 0, 0))
    kv_block = pl.BlockSpec((None, None, bk, d), lambda bk_, j, *_: (bk_ // kvh, bk_ % kvh, j, 0))
    q_ids = pl.BlockSpec((None, nq, f, bq), lambda bk_, j, *_: (bk_ // kvh, 0, 0, 0))
    kv_ids = pl.BlockSpec((None, bk, f), lambda bk_, j, *_: (bk_ // kvh, j, 0))
    # [b, h, q_pad, 1] → [b, h, nq, 1, bq]: the same memory, viewed as one row per query block.
    rows = lambda x: x.reshape(b, cfg.heads, nq, 1, bq)  # noqa: E731
    out_shape = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    return _call(cfg, _dkv_kernel, "tile_attention_dkv", (b * kvh, cfg.nk), aux["q_lists"],
                 [q_ids, kv_ids, group, kv_block, kv_block, group, stat_rows, stat_rows],
                 [aux["q_ids_blocked"], aux["kv_ids"], q, k, v, do, rows(lse), rows(delta)],
                 [kv_block, kv_block], out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, aux):
    return _forward(cfg, q, k, v, aux)[0]


def _flash_fwd(cfg: _Config, q, k, v, aux):
    o, lse = _forward(cfg, q, k, v, aux)
    return o, (q, k, v, aux, o, lse)


def _flash_bwd(cfg: _Config, residuals, do):
    q, k, v, aux, o, lse = residuals
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [b, h, q_pad, 1]
    dq = _dq(cfg, q, k, v, do, lse, delta, aux)
    dk, dv = _dkv(cfg, q, k, v, do, lse, delta, aux)
    return dq, dk, dv, None  # the ids and block lists are integers: no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def tile_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask,
    *,
    scale: float,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: Any = None,
) -> jax.Array:
    """Masked GQA flash attention; differentiable in q, k, v.

    q: [batch, q_len, heads, d]; k, v: [batch, kv_len, kv_heads, d]; mask: a `MaskSpec`
    (nvlm_jax.models.attention). Same semantics as `nvlm_jax.models.attention.attention`.
    backend: "triton" | "mosaic" (default from the platform; CPU → "triton" in interpret mode);
    interpret: default True on CPU only; with the Mosaic form it may be a
    `pltpu.InterpretParams` (the TPU-semantics interpreter: SMEM/VMEM, bounds and race checks);
    block_sizes: default `DEFAULT_BLOCKS`, shrunk for short sequences.
    Returns [batch, q_len, heads, d] in q's dtype.
    """
    backend, interpret, blocks = _resolve(backend, interpret, block_sizes, q.shape[1], k.shape[1])
    reason = unsupported_reason(q.shape, k.shape, v.shape, q.dtype, mask, backend=backend, interpret=interpret,
                                block_sizes=blocks)
    if reason is not None:
        raise ValueError(f"tile_attention: {reason}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    cfg = _config(mask, q.shape, k.shape, scale, blocks, backend, interpret)
    b, s = q.shape[:2]
    bq, bk = cfg.block_q, cfg.block_k

    q_ids, kv_ids = masks.pack_ids(mask, cfg.layout, b, cfg.q_pad, cfg.kv_pad)  # [b, pad, F]
    kinds = masks.block_map(cfg.layout, q_ids, kv_ids, bq, bk)  # [b, nq, nk]
    f = len(cfg.layout.fields)
    flat = lambda lists: tuple(x.reshape(-1) for x in lists)  # noqa: E731  (1-D tables suit SMEM)
    aux = dict(
        q_ids=q_ids,
        kv_ids=kv_ids,
        q_ids_blocked=q_ids.reshape(b, cfg.nq, bq, f).transpose(0, 1, 3, 2),  # [b, nq, F, bq]
        kv_ids_blocked=kv_ids.reshape(b, cfg.nk, bk, f).transpose(0, 1, 3, 2),  # [b, nk, F, bk]
        kv_lists=flat(masks.block_lists(kinds)),
        q_lists=flat(masks.block_lists(kinds.transpose(0, 2, 1))),
    )

    def head_major(x, pad):  # [b, n, heads, d] → [b, heads, pad, d], zero-padded
        x = x.transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad - x.shape[2]), (0, 0)))

    o = _flash(cfg, head_major(q, cfg.q_pad), head_major(k, cfg.kv_pad), head_major(v, cfg.kv_pad), aux)
    return o[:, :, :s].transpose(0, 2, 1, 3)


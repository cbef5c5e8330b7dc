"""One accelerator check: the figures a GPU or TPU must show, in one run of about 8 minutes.

Sections, run in the order peaks, decode, train, attention, prefill (the never-before-compiled Pallas
kernels last), each with its own time budget inside a total of 450 s; one failing records its error
and the others still run:
- peaks:     the device's bf16 matmul FLOP/s (`metrics.measure_peak_flops`) and HBM bandwidth (a large
             reduction and a large copy), measured here; the denominators of every fraction below.
- attention: `kernels.tile_attention`, compiled (interpret mode on CPU), forward and backward on the
             three NVLM shapes of bench/attention.py and on dense causal, checked against the pure-JAX
             oracle (`kernels.reference`) with the error bars of tests/kernels/test_tile_attention.py,
             and timed against the XLA path (`nvlm_jax.models.attention`) and, on CUDA,
             `jax.nn.dot_product_attention(implementation="cudnn")`.
             Targets: >= 1.5x the XLA path on the masked tile pattern (xattn), <= 1.3x cuDNN's time
             on dense causal.
- prefill:   the 348M-class NVLM-D (ViT 512 x 8 layers, LLM 768 x 12 layers, GQA 12/4 heads, vocab
             151,680; bench/train_step.py's bench_config, enlarged) on 2 images x 7 tiles + 256 text
             tokens in bf16: time and fraction of the measured matmul peak.
- decode:    the same model, `nvlm_jax.generate.generate` greedy, batch 1 and 8, bf16 weights and
             weight-only int8 / int4 (issue 18; bf16 activations): decode tokens/s, its ratio to bf16,
             and the fraction of the measured HBM bandwidth that reading the weights once per step needs.
- train:     one bf16 training step of bench/train_step.py's model (batch 8 x 512 tokens + 1 tile):
             MFU against the measured matmul peak (target >= 45% on an H100).

    python bench/device_check.py --out $OUT/device_check.json     # GPU/TPU, ~8 min with compilation
    python bench/device_check.py --cpu-smoke --out /tmp/dc.json     # CPU, tiny shapes, < 2 min

Writes one JSON (rewritten after every section, so a run cut short keeps what it measured) and
prints a table. The exit code is 1 when any section failed (a targets miss is not a failure).
The CPU smoke run only proves the script works end to end; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from bench import attention as attention_bench  # noqa: E402
from bench import train_step as train_bench  # noqa: E402
from kernels import masks  # noqa: E402
from kernels.reference import attention_reference  # noqa: E402
from kernels.tile_attention import (  # noqa: E402
    BlockSizes,
    effective_blocks,
    mask_blocks,
    tile_attention,
    unsupported_reason,
)
from nvlm_jax import config as C  # noqa: E402
from nvlm_jax.generate import PROMPT_BUCKET, generate  # noqa: E402
from nvlm_jax.models import nvlm  # noqa: E402
from nvlm_jax.models.attention import MaskSpec, attention  # noqa: E402
from nvlm_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from nvlm_jax.train import flops as flops_lib  # noqa: E402
from nvlm_jax.train import freeze, metrics  # noqa: E402

# Max-abs-error bars against the f32 oracle run on the same bf16 inputs, as in
# tests/kernels/test_tile_attention.py: output 2e-2; gradients 2e-2 x max(1, max |oracle gradient|).
BF16_OUT_TOL = 2e-2
BF16_GRAD_TOL = 2e-2
TARGET_XATTN_SPEEDUP = 1.5  # Pallas vs the XLA path on the masked tile pattern
TARGET_CUDNN_RATIO = 1.3  # Pallas time / cuDNN time on dense causal
TARGET_MFU = 0.45  # training step on an H100


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything the mode changes: shapes, repeats and per-section budgets (seconds)."""

    matmul: int  # peak probe: matmul size³
    bandwidth_bytes: int  # bandwidth probe: array size
    causal: tuple[int, int, int, int, int]  # dense causal attention: batch, length, heads, kv heads, head dim
    tiles: tuple[int, int]  # prefill: tiles per image
    text: int  # prefill: text tokens
    prompt: int  # decode: prompt tokens
    new_tokens: tuple[int, int]  # decode: a short and a long run; their difference times the steps
    train: tuple[int, int, int, int]  # training: batch, seq, tiles, timed steps
    repeats: int
    budgets: dict[str, float]
    total_budget: float  # all sections together, from the start of main (imports not counted)


DEVICE = Sizes(matmul=8192, bandwidth_bytes=2 << 30, causal=(2, 4096, 32, 8, 128), tiles=(7, 7), text=256,
               prompt=64, new_tokens=(8, 136), train=(8, 512, 1, 5), repeats=5,
               budgets=dict(peaks=30, attention=170, prefill=75, decode=240, train=75), total_budget=580)
SMOKE = Sizes(matmul=512, bandwidth_bytes=32 << 20, causal=(1, 64, 4, 2, 16), tiles=(2, 1), text=32,
              prompt=16, new_tokens=(2, 66), train=(2, 64, 1, 1), repeats=1,
              # Generous: budgets only stop a hang; the idle 2-core machine needs ~45 s for all of it.
              budgets=dict(peaks=30, attention=120, prefill=60, decode=160, train=60), total_budget=320)
# Pallas-compiled kernels (attention, then prefill with attention "auto") run last: were one to break the
# device context, the figures of the sections before it are already in the JSON.
SECTIONS = ("peaks", "decode", "train", "attention", "prefill")
MIN_SECTION_S = 10  # a section is not started with less than this left of the total


class SectionTimeout(Exception):
    """A section ran past its budget (raised from SIGALRM between Python statements)."""


class CheckFailed(Exception):
    """A section measured everything but something was wrong (e.g. an oracle error above its bar)."""


class Log:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{time.perf_counter() - self.start:6.1f}s {stamp}] {message}", flush=True)


@dataclasses.dataclass
class Context:
    smoke: bool
    sizes: Sizes
    log: Log
    peaks: dict[str, float] = dataclasses.field(default_factory=dict)
    targets: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def backend(self) -> str:
        return jax.default_backend()

    def target(self, name: str, value: float | None, target: str, met: bool | None, note: str = "") -> None:
        if self.smoke:  # CPU smoke: the comparison is printed but means nothing
            met, note = None, (note + "; " if note else "") + "cpu-smoke: not a measurement"
        self.targets.append(dict(figure=name, value=value, target=target, met=met, note=note))


# ---- helpers -----------------------------------------------------------------------------------------


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` runs of `fn()` after one warm-up (compilation) run."""
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    return attention_bench.timed(fn, (), repeats) / 1e3


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def model_config(smoke: bool) -> C.NVLMConfig:
    """The 348M-class NVLM-D of the prefill and decode sections (smoke: `C.tiny`), bf16 throughout."""
    if smoke:
        return C.tiny("D", dtype="bfloat16", param_dtype="bfloat16")
    base = train_bench.bench_config("bfloat16", "none")
    return base.replace(vision=dataclasses.replace(base.vision, num_layers=8),
                        llm=dataclasses.replace(base.llm, vocab_size=151_680),
                        image_context_token_id=C.QWEN2_IMAGE_CONTEXT_TOKEN_ID, param_dtype="bfloat16")


def prefill_inputs(cfg: C.NVLMConfig, tiles: tuple[int, ...], text: int, seed: int = 0):
    """ids [1, seq] (half the text, then per tile 5 tag-like tokens and its image context tokens,
    then the rest of the text) and pixels [sum(tiles), size, size, 3] f32."""
    rng = np.random.default_rng(seed)
    ctx = cfg.image_context_token_id
    parts = [rng.integers(1, ctx, text // 2)]
    for _ in range(sum(tiles)):
        parts += [rng.integers(1, ctx, 5), np.full(cfg.num_image_tokens, ctx)]
    parts.append(rng.integers(1, ctx, text - text // 2))
    size = cfg.vision.image_size
    pixels = rng.standard_normal((sum(tiles), size, size, 3)).astype(np.float32)
    return np.concatenate(parts).astype(np.int32)[None], pixels


def random_qkv(b, s, t, h, kvh, d, scale, dtype, seed=0):
    """q, k, v and an output cotangent; q is drawn so that the scaled scores have unit variance (as
    for the ViT, whose q arrives pre-scaled and whose `scale` is 1)."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = (jax.random.normal(kq, (b, s, h, d)) / (scale * math.sqrt(d))).astype(dtype)
    k = jax.random.normal(kk, (b, t, kvh, d)).astype(dtype)
    v = jax.random.normal(kv, (b, t, kvh, d)).astype(dtype)
    return q, k, v, jax.random.normal(kc, (b, s, h, d)).astype(dtype)


def with_vjp(fn):
    """jit of (q, k, v, cotangent) -> (output, (dq, dk, dv)): forward and backward in one program."""

    def run(q, k, v, cot):
        out, pullback = jax.vjp(fn, q, k, v)
        return out, pullback(cot)

    return jax.jit(run)


# ---- sections -------------------------------------------------------------------------------------------


def section_peaks(ctx: Context, res: dict) -> None:
    size, nbytes, reps = ctx.sizes.matmul, ctx.sizes.bandwidth_bytes, max(ctx.sizes.repeats, 10)
    res["matmul_size"] = size
    ctx.peaks["flops"] = res["matmul_flops_per_s"] = metrics.measure_peak_flops(size, repeats=reps)
    ctx.log(f"peaks: bf16 {size}^3 matmul {res['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s")
    x = jnp.ones((nbytes // 2 // 4096, 4096), jnp.bfloat16)
    reduce, copy = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), jax.jit(lambda a: a * 2)
    reduce_s, copy_s = best_seconds(lambda: reduce(x), reps), best_seconds(lambda: copy(x), reps)
    res["bandwidth_bytes"] = x.nbytes
    res["reduce_bytes_per_s"] = x.nbytes / reduce_s  # reads the array once
    res["copy_bytes_per_s"] = 2 * x.nbytes / copy_s  # reads and writes it
    ctx.peaks["bandwidth"] = res["hbm_bytes_per_s"] = max(res["reduce_bytes_per_s"], res["copy_bytes_per_s"])
    ctx.log(f"peaks: bandwidth {res['hbm_bytes_per_s'] / 1e9:.0f} GB/s (reduce {res['reduce_bytes_per_s'] / 1e9:.0f}, "
            f"copy {res['copy_bytes_per_s'] / 1e9:.0f}) over {x.nbytes / 2**20:.0f} MiB")


def _oracle_errors(fn, args, want, want_grads) -> dict[str, Any]:
    """Max abs errors of fn's output and q/k/v gradients against the oracle's, with their bars."""
    out, grads = fn(*args)
    errors = {"out": float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32)))),
              "out_bound": BF16_OUT_TOL}
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        ref = ref.astype(jnp.float32)
        errors[name] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)))
        errors[f"{name}_bound"] = BF16_GRAD_TOL * max(1.0, float(jnp.max(jnp.abs(ref))))
    errors["ok"] = all(errors[k] <= errors[f"{k}_bound"] for k in ("out", "dq", "dk", "dv"))
    return errors


def _attention_case(ctx: Context, name, b, s, t, h, kvh, d, scale, mask, impls: dict, rec: dict) -> list[str]:
    """Fills `rec` for one shape: oracle errors of Pallas (and, for context, XLA) and per-implementation
    forward / forward+backward milliseconds. Returns the problems found."""
    problems = []
    q, k, v, cot = random_qkv(b, s, t, h, kvh, d, scale, jnp.bfloat16)
    rec.update(name=name, batch=b, q_len=s, kv_len=t, heads=h, kv_heads=kvh, head_dim=d, dtype="bfloat16")
    want = with_vjp(lambda q, k, v: attention_reference(q, k, v, mask, scale=scale))(q, k, v, cot)
    rec["oracle"], rec["ms"] = {}, {}
    for impl, fn in impls.items():
        if isinstance(fn, str):  # a reason it cannot run here
            rec["ms"][impl] = {"status": "skipped", "reason": fn}
            ctx.log(f"attention: {name}: {impl} skipped: {fn}")
            continue
        try:
            both = with_vjp(fn)
            if impl in ("pallas", "xla"):
                rec["oracle"][impl] = _oracle_errors(both, (q, k, v, cot), *want)
                if impl == "pallas" and not rec["oracle"][impl]["ok"]:
                    problems.append(f"{name}: Pallas differs from the oracle beyond the bars: {rec['oracle'][impl]}")
            fwd = jax.jit(fn)
            rec["ms"][impl] = {
                "fwd": 1e3 * median_seconds(lambda fwd=fwd: fwd(q, k, v), ctx.sizes.repeats),
                "fwd_bwd": 1e3 * median_seconds(lambda both=both: both(q, k, v, cot), ctx.sizes.repeats),
            }
        except SectionTimeout:
            raise
        except Exception as e:  # record, go on with the other implementations
            rec["ms"][impl] = {"status": "failed", "error": error_text(e)}
            if not impl.startswith("cudnn"):  # cuDNN refusing a call is the baseline's limit, not ours
                problems.append(f"{name}: {impl}: {error_text(e)}")
        ctx.log(f"attention: {name}: {impl} {rec['ms'][impl]}")
    return problems


def _ratio(rec: dict, num: str, den: str, key: str) -> float | None:
    a, b = rec["ms"].get(num, {}).get(key), rec["ms"].get(den, {}).get(key)
    return None if a is None or b is None else a / b


def section_attention(ctx: Context, res: dict) -> None:
    interpret = ctx.backend == "cpu"
    cudnn_reason = None if ctx.backend == "gpu" else f"cuDNN attention needs a CUDA GPU (backend {ctx.backend})"
    res["pallas"] = "interpret mode" if interpret else "compiled"
    res["cases"] = []
    problems = []
    for name, b, s, t, h, kvh, d, scale, mask in attention_bench.cases(ctx.smoke):
        blocks = BlockSizes(16, 16) if ctx.smoke else None  # smoke: small blocks so skipping shows
        eff = effective_blocks(s, t, interpret=interpret, block_sizes=blocks)
        rec = {"blocks": [eff.block_q, eff.block_k],
               "skipped_block_fraction": float(masks.skipped_fraction(mask_blocks(mask, b, s, t, eff)))}
        res["cases"].append(rec)
        impls = {k: f for k, f in attention_bench.implementations(mask, b, s, t, scale, interpret, eff,
                                                                  cudnn=False).items() if k in ("pallas", "xla")}
        reason = unsupported_reason((b, s, h, d), (b, t, kvh, d), (b, t, kvh, d), jnp.bfloat16, mask,
                                    interpret=interpret, block_sizes=eff)
        if reason:
            impls["pallas"] = f"kernels.tile_attention does not support it here: {reason}"
        problems += _attention_case(ctx, name, b, s, t, h, kvh, d, scale, mask, impls, rec)
        rec["pallas_speedup_vs_xla"] = {key: _ratio(rec, "xla", "pallas", key) for key in ("fwd", "fwd_bwd")}
    xattn = res["cases"][-1]
    for key in ("fwd", "fwd_bwd"):
        value = xattn["pallas_speedup_vs_xla"][key]
        ctx.target(f"attention {xattn['name']}, {key}: Pallas speed-up vs XLA", value,
                   f">= {TARGET_XATTN_SPEEDUP}x", None if value is None else value >= TARGET_XATTN_SPEEDUP)

    b, s, h, kvh, d = ctx.sizes.causal
    scale = d**-0.5
    causal = MaskSpec(causal=True, causal_by_index=True)
    impls = {
        "pallas": lambda q, k, v: tile_attention(q, k, v, causal, scale=scale, interpret=interpret),
        "xla": lambda q, k, v: attention(q, k, v, causal, scale=scale, implementation="xla"),
        "cudnn": cudnn_reason or (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn")),
    }
    rec = {}
    res["dense_causal"] = rec
    problems += _attention_case(ctx, f"dense causal {s}", b, s, s, h, kvh, d, scale, causal, impls, rec)
    rec["pallas_time_vs_cudnn"] = {key: _ratio(rec, "pallas", "cudnn", key) for key in ("fwd", "fwd_bwd")}
    rec["pallas_speedup_vs_xla"] = {key: _ratio(rec, "xla", "pallas", key) for key in ("fwd", "fwd_bwd")}
    for key in ("fwd", "fwd_bwd"):
        value = rec["pallas_time_vs_cudnn"][key]
        ctx.target(f"attention {rec['name']}, {key}: Pallas time / cuDNN time", value, f"<= {TARGET_CUDNN_RATIO}x",
                   None if value is None else value <= TARGET_CUDNN_RATIO, note=cudnn_reason or "")
    if problems:
        raise CheckFailed("; ".join(problems))


def _model(ctx: Context, res: dict):
    cfg = model_config(ctx.smoke)
    params = nvlm.init_params(cfg, jax.random.key(0))
    res["model"] = dict(params=C.param_count(cfg), vision=f"{cfg.vision.hidden_size} x {cfg.vision.num_layers}",
                        llm=f"{cfg.llm.hidden_size} x {cfg.llm.num_layers}",
                        heads=f"{cfg.llm.num_heads}/{cfg.llm.num_kv_heads}", vocab=cfg.llm.vocab_size, dtype=cfg.dtype)
    return cfg, params


def section_prefill(ctx: Context, res: dict) -> None:
    cfg, params = _model(ctx, res)
    ids, pixels = prefill_inputs(cfg, ctx.sizes.tiles, ctx.sizes.text)
    f = flops_lib.batch_flops(cfg, 1, ids.shape[1], sum(ctx.sizes.tiles)).forward
    res.update(tokens=ids.shape[1], tiles=list(ctx.sizes.tiles), text_tokens=ctx.sizes.text, flops=f, runs={})
    impls = ["xla"] + (["auto"] if ctx.backend in ("gpu", "tpu") else [])  # auto: Pallas attention
    for impl in impls:
        run_cfg = cfg.replace(attention_impl=impl)
        fwd = jax.jit(lambda p, i, x, run_cfg=run_cfg: nvlm.NVLM(run_cfg).apply({"params": p}, i, x)[0])
        px = jnp.asarray(pixels, jnp.bfloat16)
        seconds = median_seconds(lambda fwd=fwd, px=px: fwd(params, ids, px), ctx.sizes.repeats)
        run = res["runs"][impl] = dict(ms=1e3 * seconds, flops_per_s=f / seconds)
        if "flops" in ctx.peaks:
            run["fraction_of_peak"] = f / seconds / ctx.peaks["flops"]
        ctx.log(f"prefill (attention {impl}): {run}")
    ctx.target(f"prefill {res['model']['params'] / 1e6:.3g}M NVLM-D, bf16: fraction of the measured matmul peak",
               res["runs"]["xla"].get("fraction_of_peak"), "(reported)", None)


def decode_bytes(params, cfg: C.NVLMConfig, batch: int, slots: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decode step reads: every LLM weight but the embedding
    table (one row per token), and the whole cache (the XLA path reads every slot, masked)."""
    llm = params["llm"]
    # int4 weights: 4 bits each (XLA packs them two to a byte on GPU/TPU)
    nbytes = lambda tree: sum(x.size // 2 if x.dtype == jnp.int4 else x.nbytes  # noqa: E731
                              for x in jax.tree_util.tree_leaves(tree))
    item = jnp.dtype(cfg.dtype).itemsize
    weights = nbytes(llm) - nbytes(llm["embed_tokens"]) + batch * cfg.llm.hidden_size * item
    m = cfg.llm
    cache = m.num_layers * 2 * batch * slots * m.num_kv_heads * m.head_dim * item
    return weights, cache


def section_decode(ctx: Context, res: dict) -> None:
    from nvlm_jax.checkpoint.quantized import quantize_params

    cfg_bf16, params_bf16 = _model(ctx, res)
    short, long = ctx.sizes.new_tokens
    res.update(prompt_tokens=ctx.sizes.prompt, new_tokens=[short, long], runs={})
    rng = np.random.default_rng(0)
    for fmt in ("bf16", "int8", "int4"):  # int8/int4: weight-only (issue 18), bf16 activations
        cfg, params = cfg_bf16, params_bf16
        if fmt != "bf16":
            cfg, params = quantize_params(jax.tree_util.tree_map(jnp.copy, params_bf16), cfg_bf16, fmt)
        # The CPU smoke run only proves the script: int8/int4 at batch 1 (4 fewer compiles).
        for batch in (1,) if ctx.smoke and fmt != "bf16" else (1, 8):
            prompts = rng.integers(1, cfg.image_context_token_id, (batch, ctx.sizes.prompt)).astype(np.int32)
            # Best of a few runs each: the difference of two timings is what counts, so noise must stay small.
            t = {n: best_seconds(lambda n=n, p=prompts, c=cfg, w=params: generate(w, c, p, max_new_tokens=n).tokens,
                                 max(ctx.sizes.repeats, 3)) for n in (short, long)}
            if t[long] <= t[short]:
                raise CheckFailed(f"{fmt} batch {batch}: {long} new tokens took {t[long]:.4f} s, not more than "
                                  f"{short} ({t[short]:.4f} s): the timings are noise")
            step_s = (t[long] - t[short]) / (long - short)  # prefill and the first tokens cancel out
            slots = -(-ctx.sizes.prompt // PROMPT_BUCKET) * PROMPT_BUCKET + long
            weights, cache = decode_bytes(params, cfg, batch, slots)
            run = res["runs"][f"{fmt} batch {batch}"] = dict(
                step_ms=1e3 * step_s, decode_tokens_per_s=batch / step_s,
                end_to_end_tokens_per_s=batch * long / t[long], weight_bytes_per_step=weights,
                kv_cache_bytes_per_step=cache)
            if "bandwidth" in ctx.peaks:
                run["weights_fraction_of_bandwidth"] = weights / step_s / ctx.peaks["bandwidth"]
                run["weights_and_cache_fraction_of_bandwidth"] = (weights + cache) / step_s / ctx.peaks["bandwidth"]
            if fmt != "bf16":
                run["tokens_per_s_vs_bf16"] = run["decode_tokens_per_s"] / res["runs"][f"bf16 batch {batch}"][
                    "decode_tokens_per_s"]
            ctx.log(f"decode: {fmt} batch {batch}: {run}")
            ctx.target(f"decode {res['model']['params'] / 1e6:.3g}M NVLM-D, {fmt} weights, batch {batch}: weight "
                       "bytes/step/time vs measured bandwidth", run.get("weights_fraction_of_bandwidth"),
                       "(reported)", None)
        del params


def section_train(ctx: Context, res: dict) -> None:
    batch, seq, tiles, steps = ctx.sizes.train
    cfg = C.tiny("D", dtype="bfloat16") if ctx.smoke else train_bench.bench_config("bfloat16", "none")
    stage = "sft"
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        step, state, dev_batch, _, _ = train_bench.build_step(cfg, batch, seq, tiles, stage, mesh)
        compile_s, times, m = train_bench.run_steps(step, state, dev_batch, steps)
    f = flops_lib.batch_flops(cfg, batch, seq, tiles, freeze.trained_subtrees("D", stage)).training
    step_s = float(np.median(times))
    res.update(params=C.param_count(cfg), batch=batch, seq=seq, tiles=tiles, stage=stage, dtype="bfloat16",
               compile_s=compile_s, step_ms=1e3 * step_s, steps=len(times), loss=float(m["loss"]), flops=f,
               flops_per_s=f / step_s)
    if not math.isfinite(res["loss"]):
        raise CheckFailed(f"training loss is {res['loss']}")
    if "flops" in ctx.peaks:
        res["mfu"] = f / step_s / ctx.peaks["flops"]
    ctx.log(f"train: step {res['step_ms']:.1f} ms, MFU {res.get('mfu', float('nan')):.1%} (compile {compile_s:.1f} s)")
    mfu = res.get("mfu")
    ctx.target(f"train step {res['params'] / 1e6:.3g}M NVLM-D, bf16: MFU vs the measured matmul peak", mfu,
               f">= {TARGET_MFU:.0%} (H100)", None if mfu is None else mfu >= TARGET_MFU)


RUNNERS = dict(peaks=section_peaks, attention=section_attention, prefill=section_prefill, decode=section_decode,
               train=section_train)


# ---- running -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises SectionTimeout in this (main) thread once `seconds` have passed."""

    def expire(signum, frame):
        raise SectionTimeout(f"ran past its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(ctx: Context, name: str, budget: float) -> dict[str, Any]:
    res: dict[str, Any] = {}
    record: dict[str, Any] = {"status": "ok", "budget_s": budget, "results": res}
    ctx.log(f"{name}: start (budget {budget:.0f} s)")
    start = time.perf_counter()
    try:
        with deadline(budget):
            RUNNERS[name](ctx, res)
    except (SectionTimeout, CheckFailed) as e:
        record.update(status="failed", error=error_text(e))
    except Exception as e:  # one section's failure must not stop the others
        record.update(status="failed", error=error_text(e), traceback=traceback.format_exc()[-3000:])
    record["seconds"] = round(time.perf_counter() - start, 2)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        record["device_peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    ctx.log(f"{name}: {record['status']} in {record['seconds']:.1f} s" + (f": {record['error']}"
                                                                          if "error" in record else ""))
    return record


def environment() -> dict[str, Any]:
    import flax
    import jaxlib

    device = jax.devices()[0]
    return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, backend=jax.default_backend(), device_kind=device.device_kind,
                device_count=jax.device_count(), host=platform.node(), host_cpus=os.cpu_count())


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
    tmp.replace(path)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\ndevice check ({report['mode']}): jax {env['jax']} on {env['backend']} ({env['device_kind']}), "
          f"python {env['python']}, {report['seconds']:.0f} s")
    print(f"{'section':<11}{'status':<9}{'seconds':>8}  note")
    for name, sec in report["sections"].items():
        print(f"{name:<11}{sec['status']:<9}{sec.get('seconds', 0):>8.1f}  {sec.get('error', sec.get('reason', ''))}")
    print(f"\n{'figure':<92}{'value':>9}  {'target':<14}met")
    for t in report["targets"]:
        print(f"{t['figure'][:91]:<92}{_fmt(t['value']):>9}  {t['target']:<14}{_fmt(t['met'])}")
    print(f"\nstatus: {report['status']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="device_check.json", help="where the JSON report goes")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, Pallas in interpret mode, tiny shapes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget_scale", type=float, default=1.0,
                        help="multiplies every section's budget and the total (e.g. 2 for a slow first compile)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    names = [n for n in args.sections.split(",") if n]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    ctx = Context(smoke=args.cpu_smoke, sizes=SMOKE if args.cpu_smoke else DEVICE, log=Log())
    out = Path(args.out)
    report: dict[str, Any] = dict(script="bench/device_check.py", mode="cpu-smoke" if ctx.smoke else "device",
                                  started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                  environment=environment(), status="running", seconds=0.0, sections={},
                                  targets=ctx.targets)
    env = report["environment"]
    ctx.log(f"jax {env['jax']}, backend {env['backend']} ({env['device_kind']}), sections {names} -> {out}")
    if ctx.backend == "cpu" and not ctx.smoke:
        ctx.log("warning: no accelerator; full sizes on CPU take far longer than the budgets (use --cpu-smoke)")
    total = ctx.sizes.total_budget * args.budget_scale
    for name in SECTIONS:
        if name not in names:
            continue
        left = total - (time.perf_counter() - ctx.log.start)
        if left < MIN_SECTION_S * args.budget_scale:
            report["sections"][name] = {"status": "skipped", "reason": f"the {total:.0f} s total was spent"}
            ctx.log(f"{name}: skipped, the {total:.0f} s total was spent")
            continue
        # Marked before it starts: if the process is killed (a hung kernel), the JSON says where.
        report["sections"][name] = {"status": "running", "started_at_s": round(time.perf_counter() - ctx.log.start, 1)}
        write_json(out, report)
        report["sections"][name] = run_section(ctx, name, min(ctx.sizes.budgets[name] * args.budget_scale, left))
        report["seconds"] = round(time.perf_counter() - ctx.log.start, 1)
        write_json(out, report)
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    report["status"] = "failed" if failed else "ok"
    report["failed_sections"] = failed
    write_json(out, report)
    print_table(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

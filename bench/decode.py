"""Greedy decoding throughput: `nvlm_jax.generate` vs transformers `generate`, same model, same CPU.

The model is a small random Qwen2-style LLM (~45M params: 8 layers, hidden 512, GQA 8/4 heads,
vocab 32000) inside a tiny NVLM-D; both sides run float32 with the same weights (moved through
the project's weight map) on text prompts of 64 tokens, producing 64 new tokens each (no early
stop). Reports tokens/s (new tokens over wall time, prefill included) for batch 1 and 8, after
one warm-up call (which compiles the JAX programs), median of `--repeats` interleaved runs, and
checks that both produce the same tokens.

Run from the repo root: `python bench/decode.py [--repeats 3] [--new_tokens 64]`.

`--weights` runs the weight-format table instead (issue 18): the 348M-class NVLM-D of
`bench/device_check.py` (ViT 512 x 8, LLM 768 x 12, GQA 12/4, vocab 151,680): greedy decode
steps at a KV cache of `--prompt_len + --new_tokens` slots, batch 1 and 8, with float32 /
bfloat16 / int8 / int4 weights (int8/int4: weight-only, float32 activations; "int8/bf16": int8
weights with bfloat16 activations, as the serve and chat CLIs run by default); each format's
weight-bandwidth limit is the bytes one step reads (every LLM weight but the embedding table;
int4 counted at 4 bits) over the read bandwidth measured in the same run (the faster of a sum over
1 GiB and a float32 one-row product with a 256 MiB matrix).
Its compute limit is the step's weight FLOPs (2 x batch x those weights' parameters) over the
peak of one large matmul measured in the same run (f32, or bf16 for bf16 weights; int8/int4 run
f32 products). The roofline is the larger of the two times: a batch-1 step is bandwidth-bound;
at batch 8, int8 and int4 are compute-bound on a 2-core CPU, which caps what "of the bandwidth
limit" they can reach.
Each format runs with the decoder layers' params stacked (as stored; a scan) and per layer
(`NVLMConfig.layer_layout`, what `load_pretrained` picks for NVLM-D on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import linen as nn  # noqa: E402

from nvlm_jax import config as C  # noqa: E402
from nvlm_jax.generate import generate  # noqa: E402
from nvlm_jax.models import nvlm as nvlm_model  # noqa: E402
from nvlm_jax.weight_map import params_from_tensors  # noqa: E402


def build(seed: int = 0):
    llm = C.LLMConfig(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                      intermediate_size=1536, rope_theta=10000.0, max_position_embeddings=4096)
    base = C.tiny("D")
    cfg = base.replace(llm=llm, projector=dataclasses.replace(base.projector, hidden_size=1536, output_size=512),
                       image_context_token_id=31999)
    tc = transformers.Qwen2Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rms_norm_eps=llm.rms_norm_eps, max_position_embeddings=llm.max_position_embeddings,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(tc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    shapes = nn.meta.unbox(nvlm_model.abstract_params(cfg))
    params = jax.device_get(nvlm_model.init_params(cfg, jax.random.key(seed)))
    params["llm"] = params_from_tensors(state, cfg, "llm", shapes, subtree=("llm",))
    params = jax.device_put(params)
    return cfg, params, model


def runners(cfg, params, model, prompts, new_tokens):
    """Zero-argument callables returning the new tokens [batch, new_tokens] of each side."""
    ids = torch.from_numpy(np.stack(prompts)).long()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)

    def ours():
        return generate(params, cfg, prompts, max_new_tokens=new_tokens).tokens

    def theirs():
        with torch.no_grad():
            return model.generate(ids, **kwargs)[:, ids.shape[1] :].numpy()

    return ours, theirs


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compiles
    return min(timed(lambda: jax.block_until_ready(fn())) for _ in range(repeats))


def read_bandwidth(repeats: int = 5) -> tuple[float, float]:
    """Bytes/s of two reads far beyond any cache, each array read once: a float32 sum over 1 GiB,
    and a float32 one-row product with a 256 MiB matrix (the CPU's dot library). On this project's
    CPU each was the faster one in some runs; the limits use the faster of the two."""
    summed = _sum_rate(repeats)  # its 1 GiB is freed before the matrix below is made
    w = jax.numpy.ones((1024, 1 << 16), jax.numpy.float32)
    row = jax.numpy.ones((1, 1024), jax.numpy.float32)
    product = jax.jit(lambda r, m: r @ m)
    return summed, w.nbytes / best_seconds(lambda: product(row, w), repeats)


def _sum_rate(repeats: int) -> float:
    x = jax.numpy.ones((1 << 28,), jax.numpy.float32)
    total = jax.jit(lambda a: a.sum())
    return x.nbytes / best_seconds(lambda: total(x), repeats)


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one n x n x n matmul in `dtype` with f32 accumulation (the CPU's dot library)."""
    a = jax.numpy.ones((n, n), dtype)
    product = jax.jit(lambda x, y: jax.numpy.dot(x, y, preferred_element_type=jax.numpy.float32))
    return 2 * n**3 / best_seconds(lambda: product(a, a), repeats)


def step_weight_params(params) -> int:
    """Parameters of the LLM weights one decode step multiplies by (not the embedding table)."""
    llm = {k: v for k, v in params["llm"].items() if k != "embed_tokens"}
    return sum(x.size for x in jax.tree_util.tree_leaves(llm) if x.ndim >= 2)


def step_weight_bytes(params) -> int:
    """Bytes of the LLM weights one decode step reads (not the embedding table; int4 at 4 bits)."""
    llm = {k: v for k, v in params["llm"].items() if k != "embed_tokens"}
    return sum(x.size // 2 if x.dtype == jax.numpy.int4 else x.nbytes for x in jax.tree_util.tree_leaves(llm))


def step_seconds(cfg, params, batch: int, slots: int, repeats: int) -> float:
    """Fastest of `repeats` greedy decode steps (`generate.decode_step` + argmax, the body of
    generate's loop) at cache slot `slots - 1` of a `[batch, slots]` cache, the cache donated and
    fed back as in the loop. One step per timing: background load only ever adds time."""
    from nvlm_jax.generate import decode_step
    from nvlm_jax.models.llm import init_cache

    model = nvlm_model.NVLM(cfg)

    @functools.partial(jax.jit, donate_argnums=2)
    def step(params, tok, cache):
        pos = jax.numpy.full((batch,), slots - 1, jax.numpy.int32)
        logits, cache = decode_step(model, {"params": params}, tok, pos, cache, slots - 1, {})
        return jax.numpy.argmax(logits, -1).astype(jax.numpy.int32), cache

    tok = jax.numpy.ones((batch,), jax.numpy.int32)
    cache = init_cache(cfg.llm, batch, slots, jax.numpy.dtype(cfg.dtype))
    tok, cache = jax.block_until_ready(step(params, tok, cache))  # compiles
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tok, cache = jax.block_until_ready(step(params, tok, cache))
        best = min(best, time.perf_counter() - start)
    return best


def weights_main(args) -> None:
    from bench import device_check
    from nvlm_jax.checkpoint.quantized import quantize_params
    from nvlm_jax.models.layer_layout import to_layout

    f32 = device_check.model_config(False).replace(dtype="float32", param_dtype="float32")
    base = nvlm_model.init_params(f32, jax.random.key(0))
    summed, row_product = read_bandwidth()
    bandwidth = max(summed, row_product)
    peak = {name: matmul_peak(name) for name in ("float32", "bfloat16")}
    slots = args.prompt_len + args.new_tokens
    print(f"model: 348M-class NVLM-D ({C.param_count(f32) / 1e6:.0f}M params), one greedy decode step at a "
          f"{slots}-slot KV cache, best of {args.repeats}; read bandwidth {bandwidth / 1e9:.1f} GB/s (1 GiB sum "
          f"{summed / 1e9:.1f}, one-row f32 product {row_product / 1e9:.1f}); matmul peak "
          f"f32 {peak['float32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s; "
          f"jax {jax.__version__} ({jax.devices()[0].platform})")
    step_ms = {}
    for name in ("float32", "bfloat16", "int8", "int4", "int8/bf16"):
        if name.startswith(("int8", "int4")):
            cfg, params = quantize_params(jax.tree_util.tree_map(lambda x: x.copy(), base), f32, name[:4])
            if name.endswith("/bf16"):  # bf16 activations: the serve and chat CLIs' default dtype
                cfg = cfg.replace(dtype="bfloat16")
        else:
            cfg = f32.replace(dtype=name, param_dtype=name)
            params = jax.tree_util.tree_map(lambda x, n=name: x.astype(n), base)
        weights = step_weight_bytes(params)
        limit = bandwidth / weights  # steps/s if the step only read its weights at the measured bandwidth
        flops_per_row = 2 * step_weight_params(params)
        name_peak = peak["bfloat16" if name == "bfloat16" else "float32"]
        for layout in ("stacked", "per_layer"):
            # to_layout frees what it converts: the per-layer run gets a copy (`base` stays whole)
            source = params if layout == "stacked" else jax.tree_util.tree_map(lambda x: x.copy(), params)
            lcfg, lparams = to_layout(source, cfg, layout)
            for batch in (1, 8):
                step = step_seconds(lcfg, lparams, batch, slots, args.repeats)
                ms = step_ms[name, layout, batch] = 1e3 * step
                roofline = max(1 / limit, batch * flops_per_row / name_peak)  # seconds: bytes or FLOPs bound
                print(f"{name:9s} {layout:9s} batch {batch}: step {ms:7.1f} ms, {batch / step:7.1f} tok/s, weights "
                      f"{weights / 2**20:6.0f} MiB/step, {1 / step / limit:.2f} of its weight-bandwidth limit, "
                      f"{roofline / step:.2f} of its roofline ({'compute' if roofline > 1 / limit else 'bandwidth'}), "
                      f"{step_ms['float32', layout, batch] / ms:.2f}x float32's tok/s, "
                      f"{step_ms[name, 'stacked', batch] / ms:.2f}x stacked", flush=True)
            del lparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--weights", action="store_true", help="the weight-format table (see module doc)")
    args = parser.parse_args()
    if args.weights:
        return weights_main(args)
    torch.set_num_threads(2)
    cfg, params, model = build()
    n = sum(x.size for x in jax.tree_util.tree_leaves(params["llm"]))
    print(f"model: Qwen2-style LLM, {n / 1e6:.1f}M params, float32; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        prompts = [rng.integers(1, 31000, args.prompt_len).astype(np.int32) for _ in range(batch)]
        ours, theirs = runners(cfg, params, model, prompts, args.new_tokens)
        same = float(np.mean(ours() == theirs()))  # also the warm-up (compiles the JAX programs)
        # Interleaved, so both sides see the same background load of the shared machine.
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t_ours.append(timed(ours))
            t_hf.append(timed(theirs))
        t_ours, t_hf = statistics.median(t_ours), statistics.median(t_hf)
        tps_ours, tps_hf = batch * args.new_tokens / t_ours, batch * args.new_tokens / t_hf
        print(f"batch {batch}: nvlm_jax {tps_ours:8.1f} tok/s ({t_ours:.2f} s) | transformers {tps_hf:8.1f} tok/s "
              f"({t_hf:.2f} s) | speed-up {tps_ours / tps_hf:.2f}x | same tokens {same:.1%}")

if __name__ == "__main__":
    main()

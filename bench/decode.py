"""Greedy decoding throughput: `nvlm_jax.generate` vs transformers `generate`, same model, same CPU.

The model is a small random Qwen2-style LLM (~45M params: 8 layers, hidden 512, GQA 8/4 heads,
vocab 32000) inside a tiny NVLM-D; both sides run float32 with the same weights (moved through
the project's weight map) on text prompts of 64 tokens, producing 64 new tokens each (no early
stop). Reports tokens/s (new tokens over wall time, prefill included) for batch 1 and 8, after
one warm-up call (which compiles the JAX programs), median of `--repeats` interleaved runs, and
checks that both produce the same tokens.

Run from the repo root: `python bench/decode.py [--repeats 3] [--new_tokens 64]`.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=64)
    args = parser.parse_args()
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

"""The decoder against transformers' Qwen2ForCausalLM / LlamaForCausalLM, plus cache and masks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nvlm_jax import config as C
from nvlm_jax.models.llm import LLM, init_cache
from nvlm_jax.weight_map import params_from_tensors
from tests import torch_reference as ref
from tests.models.cache_hlo import whole_cache_copies

QWEN2 = C.LLMConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=112, rope_theta=10000.0, qkv_bias=True,
                    max_position_embeddings=512, family="qwen2")
LLAMA = dataclasses.replace(QWEN2, qkv_bias=False, family="llama", num_kv_heads=1,
                            rms_norm_eps=1e-5, rope_theta=5e6)


def _nvlm_cfg(llm_cfg):
    return C.tiny("D").replace(llm=llm_cfg, projector=dataclasses.replace(
        C.tiny("D").projector, output_size=llm_cfg.hidden_size))


def _convert(torch_model, llm_cfg):
    cfg = _nvlm_cfg(llm_cfg)
    shapes = ref.expected_shapes(cfg)
    return params_from_tensors(ref.state_numpy(torch_model), cfg, "llm", shapes, subtree=("llm",))


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request):
    cfg = QWEN2 if request.param == "qwen2" else LLAMA
    model = ref.torch_llm(cfg, seed=3)
    return cfg, model, _convert(model, cfg)


def test_logits_and_hidden_match_transformers(pair):
    cfg, model, params = pair
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    logits, _, hidden = LLM(cfg).apply({"params": params}, jnp.asarray(ids), return_hidden=True)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=2e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden), out.hidden_states[-1].numpy(), atol=2e-4, rtol=0)


def test_qwen2_biases_are_used():
    # A model whose q/k/v biases were silently dropped would still run; make sure they matter.
    model = ref.torch_llm(QWEN2, seed=3)
    params = _convert(model, QWEN2)
    ids = jnp.arange(10)[None] % QWEN2.vocab_size
    base, _ = LLM(QWEN2).apply({"params": params}, ids)
    params["layers"]["k_proj"]["bias"] = params["layers"]["k_proj"]["bias"] + 1.0
    bumped, _ = LLM(QWEN2).apply({"params": params}, ids)
    assert np.abs(np.asarray(base - bumped)).max() > 1e-3


def test_incremental_decode_with_cache_equals_full_forward(pair):
    cfg, _, params = pair
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)))
    full, _ = LLM(cfg).apply({"params": params}, ids)
    cache = init_cache(cfg, batch=2, max_len=16, dtype=jnp.float32)
    prefill, cache = LLM(cfg).apply({"params": params}, ids[:, :8], cache=cache, cache_index=0)
    steps = [prefill]
    for t in range(8, 12):
        step, cache = LLM(cfg).apply({"params": params}, ids[:, t:t + 1], cache=cache, cache_index=t)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5)


def test_packed_segments_equal_separate_sequences(pair):
    cfg, _, params = pair
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 5)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None])
    seg = jnp.asarray([[1] * 7 + [2] * 5 + [0, 0]])
    pos = jnp.asarray([list(range(7)) + list(range(5)) + [0, 0]])
    out, _ = LLM(cfg).apply({"params": params}, packed, positions=pos, segment_ids=seg)
    la, _ = LLM(cfg).apply({"params": params}, jnp.asarray(a[None]))
    lb, _ = LLM(cfg).apply({"params": params}, jnp.asarray(b[None]))
    np.testing.assert_allclose(np.asarray(out[0, :7]), np.asarray(la[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 7:12]), np.asarray(lb[0]), atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))


def test_tied_embeddings_have_no_lm_head():
    cfg = dataclasses.replace(QWEN2, tie_word_embeddings=True)
    params = LLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert "lm_head" not in params
    assert C.llm_param_count(cfg) == sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_scan_stacks_layers_on_axis_zero():
    params = LLM(QWEN2).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    q = params["layers"]["q_proj"]["kernel"]
    assert q.value.shape == (2, 64, 4, 16)
    assert q.names == ("layers", "embed", "q_heads", "head_dim")


def test_a_bits_cache_needs_a_16_bit_compute_dtype():
    # init_cache holds a bf16 cache as its raw bits (uint16); an f32 decoder cannot tell which
    # 16-bit float they are, so it refuses them instead of reading garbage.
    model = LLM(QWEN2)  # float32 compute
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    cache = init_cache(QWEN2, batch=1, max_len=8, dtype=jnp.bfloat16)
    assert cache["k"].dtype == jnp.uint16 and cache["segment_ids"].dtype == jnp.int32
    with pytest.raises(ValueError, match="raw 16-bit float bits .* needs a 16-bit compute dtype, not float32"):
        model.apply({"params": params}, jnp.ones((1, 1), jnp.int32), cache=cache, cache_index=0)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("row_index", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_writes_the_cache_in_place(per_layer, row_index, dtype):
    # Each layer writes only its new keys/values into the stacked cache. Before, the layer scan
    # built the next cache as a fresh zeroed stack plus whole copies (~4 passes over it per step);
    # a bf16 cache was updated through an f32 copy of it.
    model = LLM(QWEN2, dtype=jnp.dtype(dtype), per_layer=per_layer)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    cache = init_cache(QWEN2, batch=2, max_len=16, dtype=jnp.dtype(dtype))  # bf16: its raw bits
    index = jnp.array([5, 9]) if row_index else 7

    @functools.partial(jax.jit, donate_argnums=2)  # donated, as generate and the serve engine do
    def step(params, tok, cache):
        return model.apply({"params": params}, tok, cache=cache, cache_index=index)

    hlo = step.lower(params, jnp.ones((2, 1), jnp.int32), cache).compile().as_text()
    whole = whole_cache_copies(hlo, cache["k"].shape, dtype)
    assert not whole, whole[:3]
    # ...and what it writes is right: the new token's k/v at its index, the rest untouched.
    cache = {name: a + 1 if name in ("k", "v") else a for name, a in cache.items()}
    before = jax.tree.map(np.asarray, cache)
    _, new = step(params, jnp.ones((2, 1), jnp.int32), cache)
    for name in ("k", "v"):
        at = np.asarray(index) if row_index else np.full(2, 7)
        changed = np.any(np.asarray(new[name]) != before[name], axis=(0, 3, 4))  # [batch, len]
        np.testing.assert_array_equal(changed, np.arange(16)[None] == at[:, None])

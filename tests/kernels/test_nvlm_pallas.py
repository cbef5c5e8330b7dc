"""Tiny NVLM-D/X/H models with `attention_impl="pallas"` (interpret mode on CPU) equal "xla".

Every attention of the model goes through the kernel: the ViT (bidirectional, tiles), the decoder
(causal over packed/padded positions) and, for X/H, the gated cross-attention (tile rule). The
gates are open so the cross-attention actually contributes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from kernels import tile_attention as kernel_module
from kernels.tile_attention import tile_attention
from nvlm_jax import config as C
from nvlm_jax.models import nvlm
from tests.models.xh_inputs import TAG_TOKENS, build_row


def _d_inputs(cfg, tiles=(2, 1), seed=0):
    rng = np.random.default_rng(seed)
    ctx = cfg.image_context_token_id
    ids = list(rng.integers(1, ctx - 1, 5))
    for n in tiles:
        for _ in range(n):
            ids += list(rng.integers(1, ctx - 1, 3)) + [ctx] * cfg.num_image_tokens
        ids += list(rng.integers(1, ctx - 1, 2))
    pixels = rng.standard_normal((sum(tiles), 28, 28, 3)).astype(np.float32)
    return (jnp.asarray(np.asarray(ids, np.int32)[None]), jnp.asarray(pixels)), {}


def _xh_inputs(cfg, tiles=(3, 1), slots=5, seed=0):
    row = build_row(cfg.arch, list(tiles), cfg.num_image_tokens, cfg.image_context_token_id, slots, seed=seed)
    pixels = np.random.default_rng(seed + 1).standard_normal((1, slots, 28, 28, 3)).astype(np.float32)
    pixels[0, ~row["tile_valid"]] = 0
    b = {k: jnp.asarray(row[k][None]) for k in ("input_ids", "tile_valid", "tile_image", "token_image", "token_tile")}
    args = (b["input_ids"], jnp.asarray(pixels), b["tile_valid"])
    return args, dict(tile_image=b["tile_image"], token_image=b["token_image"], token_tile=b["token_tile"])


def _random_params(cfg, seed=7):
    """Random params of the model's exact tree (`abstract_params`), filled on the host.

    Equivalent for a parity test to `init_params` (both implementations see the same params) but
    without compiling the whole initialiser (~20 s per model on a loaded 2-core machine). Norm
    scales sit around 1 and the X/H gates are open, so every attention path contributes.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        x = 0.1 * rng.standard_normal(leaf.shape)
        if name.endswith(("['scale']", "_norm']")):
            x = x + 1.0
        if name.endswith(("_gate']",)):
            x = np.full(leaf.shape, 0.7)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(nvlm.abstract_params(cfg)))


def _setup(arch):
    cfg = C.tiny(arch) if arch == "D" else C.tiny(arch, max_tag_tokens=TAG_TOKENS + 1)
    args, kwargs = _d_inputs(cfg) if arch == "D" else _xh_inputs(cfg)
    return cfg, _random_params(cfg), args, kwargs


def _logits(cfg, impl, params, args, kwargs):
    model = nvlm.NVLM(cfg.replace(attention_impl=impl))
    return jax.jit(lambda p, a: model.apply({"params": p}, *a, **kwargs)[0])(params, args)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_pallas_forward_equals_xla(arch, monkeypatch):
    cfg, params, args, kwargs = _setup(arch)
    want = _logits(cfg, "xla", params, args, kwargs)
    calls = set()  # (q shape, k shape) of each traced kernel call: proves every site used it

    def spy(q, k, v, mask, **kw):
        calls.add((q.shape, k.shape))
        return tile_attention(q, k, v, mask, **kw)

    monkeypatch.setattr(kernel_module, "tile_attention", spy)
    got = _logits(cfg, "pallas", params, args, kwargs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    sites = {c for c in calls if c[0][1] > 1}  # (the decoder also traces a 1-token dummy layer)
    assert len(sites) == (2 if arch == "D" else 3), calls  # ViT, decoder (+ cross-attention)


@pytest.mark.slow
def test_pallas_gradients_equal_xla_through_nvlm_x():
    cfg, params, args, kwargs = _setup("X")
    weights = jax.random.normal(jax.random.key(0), (1, args[0].shape[1], cfg.llm.vocab_size))

    def grads(impl):
        model = nvlm.NVLM(cfg.replace(attention_impl=impl))
        loss = lambda p: jnp.sum(model.apply({"params": p}, *args, **kwargs)[0] * weights)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    want, got = grads("xla"), grads("pallas")
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(got), strict=True):
        scale = max(1.0, float(jnp.abs(w).max()))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))

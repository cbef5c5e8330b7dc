"""The analytic FLOP count against XLA's own count of the compiled programs.

XLA's `cost_analysis()` counts a `while` loop body once, whatever its trip count, so the
comparison uses one ViT layer and one decoder layer (the scans then run once); the layer
multiplication itself is checked separately. Tolerance: 5% (XLA also counts elementwise ops,
which the analytic count leaves out). Not compared: NVLM-X pretraining (only the cross-attention
blocks train), where XLA drops the input gradient of a single, unrolled group that a real
multi-group scan computes (see `flops.py`).
"""

import dataclasses

import jax
import numpy as np
import pytest

from nvlm_jax.config import tiny
from nvlm_jax.models import nvlm
from nvlm_jax.train import flops, freeze
from nvlm_jax.train import step as S
from tests.train import fakes

B, SEQ, TILES = 2, 96, 2


def _one_layer(arch):
    cfg = tiny(arch)
    vision = dataclasses.replace(cfg.vision, hidden_size=96, intermediate_size=192, num_heads=2, num_layers=1)
    llm = dataclasses.replace(cfg.llm, hidden_size=192, intermediate_size=384, num_heads=4, num_kv_heads=2,
                              head_dim=48, num_layers=1, vocab_size=640)
    proj = dataclasses.replace(cfg.projector, input_size=4 * 96, hidden_size=384, output_size=192)
    return cfg.replace(vision=vision, llm=llm, projector=proj, image_context_token_id=639)


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_forward_flops_match_xla():
    cfg = _one_layer("D")
    params = S.param_shapes(cfg)
    batch = fakes.random_batch(cfg, 0, batch_size=B, seq_len=SEQ, tile_slots=TILES)
    xla = _xla_flops(lambda p, b: nvlm.apply_batch(p, cfg, b), params, batch)
    ours = flops.batch_flops(cfg, B, SEQ, TILES).forward
    np.testing.assert_allclose(ours, xla, rtol=0.05)


@pytest.mark.parametrize("arch, stage", [("D", "full"), ("H", "pretrain"), ("X", "sft")])
def test_training_flops_match_xla(arch, stage):
    cfg = _one_layer(arch)
    params = S.param_shapes(cfg)
    trainable, frozen = freeze.partition(params, freeze.trainable_mask(params, arch, stage))
    batch = fakes.random_batch(cfg, 0, batch_size=B, seq_len=SEQ, tile_slots=TILES)
    grad = jax.grad(lambda t, f, b: S.batch_loss(freeze.combine(t, f), cfg, b))
    xla = _xla_flops(grad, trainable, frozen, batch)
    ours = flops.batch_flops(cfg, B, SEQ, TILES, freeze.trained_subtrees(arch, stage)).training
    np.testing.assert_allclose(ours, xla, rtol=0.05)


def test_layers_scale_linearly_and_long_causal_sequences_skip_blocks():
    cfg = _one_layer("D")
    deeper = cfg.replace(llm=dataclasses.replace(cfg.llm, num_layers=3))
    one = flops.decoder_flops(cfg, 1, 64)
    three = flops.decoder_flops(deeper, 1, 64)
    np.testing.assert_allclose(three.linear, 3 * one.linear)
    np.testing.assert_allclose(three.attention, 3 * one.attention)
    chunk = flops.QUERY_CHUNK
    assert flops.attention_pairs(chunk, chunk, causal=True) == chunk * chunk
    assert flops.attention_pairs(2 * chunk, 2 * chunk, causal=True) == chunk * chunk + chunk * 2 * chunk
    assert flops.attention_pairs(2 * chunk, 2 * chunk, causal=False) == 4 * chunk * chunk


def test_frozen_vit_costs_its_forward_only():
    cfg = _one_layer("D")
    pretrain = flops.batch_flops(cfg, B, SEQ, TILES, freeze.trained_subtrees("D", "pretrain"))
    full = flops.batch_flops(cfg, B, SEQ, TILES, freeze.trained_subtrees("D", "full"))
    v, p, d = pretrain.vision, pretrain.projector, pretrain.decoder
    assert v.training(inner_grad=0, input_grad=0, trained=False) == v.forward
    np.testing.assert_allclose(full.training - pretrain.training,
                               (2 * v.linear - v.first_linear + 2 * v.attention)  # ViT backward, not into pixels
                               + p.first_linear                                  # projector input gradient
                               + d.linear + pretrain.head.linear)                # LLM weight gradients

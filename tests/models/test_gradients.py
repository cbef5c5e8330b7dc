"""Per training stage, gradients reach exactly the trainable leaves, for D, X and H."""

import jax
import numpy as np
import pytest

from nvlm_jax import config as C
from nvlm_jax.train import freeze
from nvlm_jax.train import step as S
from tests.models.xh_inputs import TAG_TOKENS, build_row
from tests.train import fakes


def _multi_tile_batch(cfg, seed=0):
    """One row with a 3-tile and a 2-tile image, so H has regular tiles in its memory."""
    row = build_row(cfg.arch, [3, 2], cfg.num_image_tokens, cfg.image_context_token_id, 6, seed=seed)
    s = len(row["input_ids"])
    rng = np.random.default_rng(seed)
    batch = {k: v[None] for k, v in row.items() if isinstance(v, np.ndarray)}
    batch.update(targets=rng.integers(0, cfg.image_context_token_id, (1, s)).astype(np.int32),
                 loss_mask=np.ones((1, s), bool), segment_ids=np.ones((1, s), np.int32),
                 positions=np.arange(s, dtype=np.int32)[None],
                 pixel_values=rng.standard_normal((1, 6, 28, 28, 3)).astype(np.float32))
    return batch


@pytest.mark.parametrize("arch, stage", [("D", "pretrain"), ("X", "sft"), ("H", "pretrain")])
def test_gradients_reach_exactly_the_trainable_leaves(arch, stage):
    cfg = C.tiny(arch, max_tag_tokens=TAG_TOKENS)
    params = fakes.random_params(cfg, 1)  # random gates: the X/H blocks are not the identity
    batch = _multi_tile_batch(cfg)
    mask = freeze.trainable_mask(params, arch, stage)
    trainable, frozen = freeze.partition(params, mask)
    grads = jax.grad(lambda t: S.batch_loss(freeze.combine(t, frozen), cfg, batch))(trainable)
    trained = freeze.trained_subtrees(arch, stage)
    for key in params:
        leaves = jax.tree_util.tree_leaves(grads.get(key))
        if key in trained:
            assert leaves and all(np.any(np.asarray(g) != 0) for g in leaves), f"{arch}/{stage}: {key} gets no gradient"
        else:
            assert not leaves, f"{arch}/{stage}: frozen {key} must get no gradient"

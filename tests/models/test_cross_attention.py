"""The gated block starts as the identity; the X/H memory mask rule."""

import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax import config as C
from nvlm_jax.models.cross_attention import GatedCrossAttention, cross_attention_mask

LLM = C.tiny("X").llm


def test_untrained_block_is_the_identity():
    x = jax.random.normal(jax.random.key(0), (2, 5, LLM.hidden_size))
    memory = jax.random.normal(jax.random.key(1), (2, 7, LLM.hidden_size))
    block = GatedCrossAttention(LLM)
    params = block.init(jax.random.key(2), x, memory, method=GatedCrossAttention.init_all)["params"]
    assert float(params["attn_gate"].value) == 0.0 and float(params["ffn_gate"].value) == 0.0
    out = block.apply({"params": params}, x, memory, method=GatedCrossAttention.init_all)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_mask_rule():
    token_image = jnp.asarray([[-1, 0, 0, 0, 1, 1]])
    token_tile = jnp.asarray([[-1, -1, 0, -1, 2, -1]])
    memory_image = jnp.asarray([[0, 0, 0, 0, 1, 1, -1, -1]])  # slots 0,1 (image 0), 2 (image 1), padding
    memory_tile = jnp.asarray([[0, 0, 1, 1, 2, 2, 3, 3]])
    mask = np.asarray(cross_attention_mask(token_image, token_tile, memory_image, memory_tile).dense(1, 6, 8))[0]
    np.testing.assert_array_equal(mask[0], [0] * 8)  # before any image
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 0, 0, 0, 0])  # image 0 text sees image 0
    np.testing.assert_array_equal(mask[2], [1, 1, 0, 0, 0, 0, 0, 0])  # tag of tile 0
    np.testing.assert_array_equal(mask[4], [0, 0, 0, 0, 1, 1, 0, 0])  # tag of tile 2
    np.testing.assert_array_equal(mask[5], [1, 1, 1, 1, 1, 1, 0, 0])  # after image 1: both images

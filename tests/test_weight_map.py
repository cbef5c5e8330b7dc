"""The HF → params table reports every problem at once."""

import numpy as np
import pytest
from flax import linen as nn

from nvlm_jax import config as C
from nvlm_jax.models import nvlm
from nvlm_jax.weight_map import params_from_tensors, rules_for

CFG = C.tiny("D")


def _llm_tensors():
    c = CFG.llm
    t = {"model.embed_tokens.weight": np.zeros((c.vocab_size, c.hidden_size)),
         "model.norm.weight": np.ones(c.hidden_size),
         "lm_head.weight": np.zeros((c.vocab_size, c.hidden_size))}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        t.update({p + "input_layernorm.weight": np.ones(c.hidden_size),
                  p + "post_attention_layernorm.weight": np.ones(c.hidden_size),
                  p + "self_attn.q_proj.weight": np.zeros((q, c.hidden_size)),
                  p + "self_attn.q_proj.bias": np.zeros(q),
                  p + "self_attn.k_proj.weight": np.zeros((kv, c.hidden_size)),
                  p + "self_attn.k_proj.bias": np.zeros(kv),
                  p + "self_attn.v_proj.weight": np.zeros((kv, c.hidden_size)),
                  p + "self_attn.v_proj.bias": np.zeros(kv),
                  p + "self_attn.o_proj.weight": np.zeros((c.hidden_size, q)),
                  p + "mlp.gate_proj.weight": np.zeros((c.intermediate_size, c.hidden_size)),
                  p + "mlp.up_proj.weight": np.zeros((c.intermediate_size, c.hidden_size)),
                  p + "mlp.down_proj.weight": np.zeros((c.hidden_size, c.intermediate_size))})
    return t


def _shapes():
    return nn.meta.unbox(nvlm.abstract_params(CFG))


def test_complete_llm_converts():
    params = params_from_tensors(_llm_tensors(), CFG, "llm", _shapes(), subtree=("llm",))
    assert params["layers"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)


def test_all_problems_are_listed_together():
    t = _llm_tensors()
    t["model.layers.0.self_attn.q_proj.weightt"] = t.pop("model.layers.0.self_attn.q_proj.weight")
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3))
    del t["model.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(ValueError) as e:
        params_from_tensors(t, CFG, "llm", _shapes(), subtree=("llm",))
    msg = str(e.value)
    assert "5 problem(s)" in msg  # the bad-shape key also leaves its layer missing
    assert "unexpected key 'model.layers.0.self_attn.q_proj.weightt'" in msg
    assert "model.layers.1.mlp.up_proj.weight" in msg and "expected (64, 128)" in msg
    assert "missing param llm/layers/q_proj/kernel for layers [0]" in msg
    assert "missing param llm/layers/v_proj/bias for layers [1]" in msg


def test_unknown_layout_is_an_error():
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        rules_for("gguf")

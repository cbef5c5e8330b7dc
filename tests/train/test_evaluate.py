"""Held-out evaluation: greedy answers from the KV-cache decoder equal the former decoder's
(full training forwards, one per token) for D, X and H, and exact-match scoring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.eval_decode import full_forward_batch, full_forward_greedy  # the former decoder: the reference
from nvlm_jax.batch_decode import greedy_batch
from nvlm_jax.config import tiny
from nvlm_jax.models import nvlm
from nvlm_jax.train import evaluate
from tests.train import fakes

CFG = tiny("D")


def _batch():
    rng = np.random.default_rng(0)
    rows = [[fakes.sample(CFG, rng, prompt_len=4, answer_len=3)], [fakes.sample(CFG, rng, prompt_len=7, answer_len=2)]]
    return fakes.pack(CFG, rows, seq_len=32, tile_slots=1)


def test_answer_spans():
    batch = _batch()
    starts, lengths = evaluate.answer_spans(batch)
    assert list(lengths) == [3, 2]
    assert all(batch["loss_mask"][r, starts[r]] and not batch["loss_mask"][r, starts[r] - 1] for r in range(2))
    packed = fakes.pack(CFG, [[fakes.sample(CFG, np.random.default_rng(1))] * 2], seq_len=64, tile_slots=2)
    with pytest.raises(ValueError, match="packed"):
        evaluate.answer_spans(packed)


# ---- NVLM-D/X/H batches for the comparison with the former decoder (bench/eval_decode.py) ----------


def _h_sample(cfg, rng, **kwargs):
    """A two-tile sample for NVLM-H: only the thumbnail's (last tile's) tokens are in the text."""
    s = fakes.sample(cfg, rng, tiles=2, **kwargs)
    keep = np.ones(len(s["ids"]), bool)
    keep[3: 3 + cfg.num_image_tokens] = False  # ids: 2 text, tag 0, tile 0's tokens, tag 1, ...
    ids = s["ids"][keep]
    return dict(s, ids=ids, targets=np.append(ids[1:], 0).astype(np.int32), loss_mask=s["loss_mask"][keep],
                token_tile=s["token_tile"][keep])


def _arch_batch(cfg, seed=0):
    """Four rows of different prompt lengths (one left without an answer), 2 tile slots."""
    rng = np.random.default_rng(seed)
    make = functools.partial(_h_sample, cfg) if cfg.arch == "H" else functools.partial(fakes.sample, cfg, tiles=2)
    rows = [[make(rng, prompt_len=p, answer_len=a)] for p, a in ((4, 6), (9, 3), (1, 5))] + [[]]
    return fakes.pack(cfg, rows, seq_len=48 if cfg.arch == "X" else 64 + 3 * cfg.num_image_tokens, tile_slots=2)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_kv_cache_answers_equal_full_forward_answers(arch):
    cfg = tiny(arch)
    params = nvlm.init_params(cfg, jax.random.key(1))
    if arch != "D":  # open the gates so the cross-attended tiles change the answers
        params["xattn"] = dict(params["xattn"], attn_gate=jnp.full_like(params["xattn"]["attn_gate"], 0.5),
                               ffn_gate=jnp.full_like(params["xattn"]["ffn_gate"], 0.5))
    batch = _arch_batch(cfg)
    starts, lengths = evaluate.answer_spans(batch)
    assert list(lengths) == [6, 3, 5, 0]
    steps = 8
    want = np.asarray(full_forward_greedy(params, full_forward_batch(batch, starts, steps), starts, cfg=cfg,
                                           max_new_tokens=steps))
    got = greedy_batch(params, cfg, batch, steps)
    np.testing.assert_array_equal(got[:3], want[:3])
    assert not (got == cfg.image_context_token_id).any()
    # The tiles matter: other pixels give other answers (so the comparison above sees them).
    other = dict(batch, pixel_values=np.asarray(batch["pixel_values"])[::-1].copy())
    assert (greedy_batch(params, cfg, other, steps)[:3] != got[:3]).any()


def test_exact_match_needs_the_stop_token_and_the_same_text(monkeypatch):
    batch = _batch()
    starts, lengths = evaluate.answer_spans(batch)
    stop = int(batch["targets"][0, starts[0] + lengths[0] - 1])  # treat row 0's last answer token as the stop
    answers = [batch["targets"][r, starts[r]: starts[r] + lengths[r]] for r in range(2)]
    # Row 0 answers exactly (then stops); row 1 repeats its first answer token and never stops.
    fake = np.zeros((2, 3), np.int32)
    fake[0, : lengths[0]] = answers[0]
    fake[1] = answers[1][0]
    monkeypatch.setattr(evaluate, "greedy_batch", lambda *a, **k: fake)
    preds = evaluate.predict(None, CFG, batch, lambda ids: " ".join(map(str, ids)), [stop])
    assert [p.correct for p in preds] == [True, False]
    assert preds[0].prediction == preds[0].reference
    tokens, stopped = evaluate.cut_at_stop([5, 6, stop, 7], [stop])
    assert tokens.tolist() == [5, 6] and stopped
    tokens, stopped = evaluate.cut_at_stop(np.array([5, 6]), [stop])
    assert tokens.tolist() == [5, 6] and not stopped

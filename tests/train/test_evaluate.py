"""Greedy answers by repeated full forwards, and exact-match scoring."""

import jax
import numpy as np

from nvlm_jax.config import tiny
from nvlm_jax.models import nvlm
from nvlm_jax.train import evaluate
from tests.train import fakes

CFG = tiny("D")


def _batch():
    rng = np.random.default_rng(0)
    rows = [[fakes.sample(CFG, rng, prompt_len=4, answer_len=3)], [fakes.sample(CFG, rng, prompt_len=7, answer_len=2)]]
    return fakes.pack(CFG, rows, seq_len=32, tile_slots=1)


def test_answer_spans_and_decoding_batch():
    batch = _batch()
    starts, lengths = evaluate.answer_spans(batch)
    assert list(lengths) == [3, 2]
    assert all(batch["loss_mask"][r, starts[r]] and not batch["loss_mask"][r, starts[r] - 1] for r in range(2))
    dec = evaluate.decoding_batch(batch, starts, max_new_tokens=6)
    real = batch["segment_ids"] > 0
    for r in range(2):
        end = starts[r] + 7
        assert (dec["segment_ids"][r, :end] == 1).all() and (dec["segment_ids"][r, end:] == 0).all()
        assert (dec["token_image"][r, starts[r] + 1: end] == batch["token_image"][r, starts[r]]).all()
        assert (dec["token_tile"][r, starts[r] + 1:] == -1).all()
    assert (dec["positions"][real] == batch["positions"][real]).all()
    packed = fakes.pack(CFG, [[fakes.sample(CFG, np.random.default_rng(1))] * 2], seq_len=64, tile_slots=2)
    try:
        evaluate.answer_spans(packed)
        raise AssertionError("packed rows must be refused")
    except ValueError as e:
        assert "packed" in str(e)


def test_greedy_fill_equals_step_by_step_argmax():
    params = fakes.random_params(CFG)
    batch = _batch()
    starts, _ = evaluate.answer_spans(batch)
    dec = evaluate.decoding_batch(batch, starts, 3)
    tokens = np.asarray(evaluate.greedy_fill(params, dec, starts, cfg=CFG, max_new_tokens=3))
    forward = jax.jit(lambda p, b: nvlm.apply_batch(p, CFG, b))
    ids = dec["input_ids"].copy()
    for j in range(3):
        logits = np.asarray(forward(params, dict(dec, input_ids=ids)))
        for r in range(2):
            row = logits[r, starts[r] + j].copy()
            row[CFG.image_context_token_id] = -np.inf
            assert tokens[r, j] == row.argmax()
            ids[r, starts[r] + j + 1] = tokens[r, j]


def test_exact_match_needs_the_stop_token_and_the_same_text(monkeypatch):
    batch = _batch()
    starts, lengths = evaluate.answer_spans(batch)
    stop = int(batch["targets"][0, starts[0] + lengths[0] - 1])  # treat row 0's last answer token as the stop
    answers = [batch["targets"][r, starts[r]: starts[r] + lengths[r]] for r in range(2)]
    # Row 0 answers exactly (then stops); row 1 repeats its first answer token and never stops.
    fake = np.zeros((2, 3), np.int32)
    fake[0, : lengths[0]] = answers[0]
    fake[1] = answers[1][0]
    monkeypatch.setattr(evaluate, "greedy_fill", lambda *a, **k: fake)
    preds = evaluate.predict(None, CFG, batch, lambda ids: " ".join(map(str, ids)), [stop])
    assert [p.correct for p in preds] == [True, False]
    assert preds[0].prediction == preds[0].reference
    assert evaluate.cut_at_stop([5, 6, stop, 7], [stop]) == ([5, 6], True)

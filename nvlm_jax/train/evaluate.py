"""Held-out evaluation during training: exact-match accuracy of greedy answers, per task.

Decoding re-runs the full training forward (`nvlm.apply_batch`) once per generated token on the
batch's static shapes, so it works for every arch (D, X, H) exactly as training sees the data;
no KV cache (fine for short answers on small models; use `nvlm_jax.generate` for long outputs).
Because the decoder is causal, the logits at position p depend only on tokens <= p: the loop
writes the token predicted at p into p + 1 and moves on, leaving whatever follows in the row
(the reference answer, padding) unseen.

Evaluation rows hold one sample each (unpacked): the prompt, then the reference answer whose
tokens are the `loss_mask` targets. The first `loss_mask` position is where decoding starts.
Exact match: the decoded text before the first stop token (`<|im_end|>`) equals the reference
answer's text (both stripped), and a stop token was produced.

Multiple processes: every process holds the same held-out batches and evaluates all of them
(the model is sharded over every process's devices, so all must take part anyway), then reads
back the whole result; all processes get the same metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvlm_jax.config import NVLMConfig
from nvlm_jax.models import nvlm
from nvlm_jax.train import multihost
from nvlm_jax.train.step import token_stats

Batch = Mapping[str, np.ndarray]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_fill(params, batch, start, *, cfg: NVLMConfig, max_new_tokens: int) -> jax.Array:
    """Greedy continuation of each row from its position `start[b]` (the last prompt token).

    batch: a training batch prepared by `decoding_batch`; start: int32 [B].
    Returns the generated token ids, int32 [B, max_new_tokens]. The image context token is
    never generated.
    """
    ids = batch["input_ids"]
    b, s = ids.shape
    rows = jnp.arange(b)

    def body(j, carry):
        ids, out = carry
        logits = nvlm.apply_batch(params, cfg, dict(batch, input_ids=ids))  # [B, S, V]
        pos = jnp.clip(start + j, 0, s - 1)
        step_logits = logits[rows, pos].at[:, cfg.image_context_token_id].set(-jnp.inf)
        tok = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
        out = out.at[:, j].set(tok)
        nxt = jnp.clip(pos + 1, 0, s - 1)
        ids = ids.at[rows, nxt].set(jnp.where(pos + 1 < s, tok, ids[rows, nxt]))
        return ids, out

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    _, out = jax.lax.fori_loop(0, max_new_tokens, body, (ids, out))
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _heldout_stats(params, batch, *, cfg: NVLMConfig):
    return token_stats(nvlm.apply_batch(params, cfg, batch), batch["targets"], batch["loss_mask"])


def answer_spans(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(start [B], length [B]) of each row's answer targets (length 0 for rows without one).

    Raises ValueError for a packed row (more than one segment) or an answer split in pieces
    (multi-turn), which this evaluation does not handle."""
    mask = np.asarray(batch["loss_mask"])
    seg = np.asarray(batch["segment_ids"])
    starts = np.zeros(len(mask), np.int32)
    lengths = mask.sum(axis=1).astype(np.int32)
    for r, row in enumerate(mask):
        if not lengths[r]:
            continue
        if seg[r].max() > 1:
            raise ValueError(f"evaluation row {r} holds {seg[r].max()} packed samples; evaluate unpacked rows")
        first = int(np.argmax(row))
        if not row[first: first + lengths[r]].all():
            raise ValueError(f"evaluation row {r} has a non-contiguous answer (multi-turn); use single-turn samples")
        starts[r] = first
    return starts, lengths


def decoding_batch(batch: Batch, starts: np.ndarray, max_new_tokens: int) -> dict[str, np.ndarray]:
    """The batch with each row's sample extended over the decoding positions: segment id 1 and
    running positions up to `start + max_new_tokens`, generated tokens inheriting the last
    prompt token's image index and naming no tile."""
    out = {k: np.array(v) for k, v in batch.items()}
    b, s = out["input_ids"].shape
    idx = np.arange(s)[None, :]
    end = np.minimum(starts[:, None] + max_new_tokens + 1, s)
    real = np.asarray(batch["segment_ids"]) > 0
    keep = real.any(axis=1, keepdims=True)  # empty rows stay empty
    out["segment_ids"] = np.where(keep & ((idx < end) | real), 1, 0).astype(np.int32)
    out["positions"] = np.broadcast_to(idx, (b, s)).astype(np.int32).copy()
    after = idx > starts[:, None]
    last_image = np.take_along_axis(out["token_image"], starts[:, None].astype(np.int64), axis=1)
    out["token_image"] = np.where(after, last_image, out["token_image"]).astype(np.int32)
    out["token_tile"] = np.where(after, -1, out["token_tile"]).astype(np.int32)
    return out


@dataclasses.dataclass
class Prediction:
    """One evaluated sample: the decoded prediction, the reference, and whether they match."""

    prediction: str
    reference: str
    correct: bool


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Tokens before the first stop token, and whether a stop token was found."""
    out = []
    for t in tokens:
        if t in stop_ids:
            return out, True
        out.append(int(t))
    return out, False


def predict(
    params,
    cfg: NVLMConfig,
    batch: Batch,
    decode: Callable[[Sequence[int]], str],
    stop_ids: Sequence[int],
    max_new_tokens: int | None = None,
) -> list[Prediction]:
    """Greedy answers for the rows of `batch` that have an answer (see module docstring).

    `max_new_tokens` defaults to the longest reference answer (its stop token included)."""
    starts, lengths = answer_spans(batch)
    has = lengths > 0
    if not has.any():
        return []
    max_new = int(max_new_tokens or lengths.max())
    # With several processes the params span all of them and the decoded rows come back sharded
    # over the batch: to_host gathers them, so every process scores every row identically.
    tokens = multihost.to_host(multihost.synced_call(greedy_fill, params, decoding_batch(batch, starts, max_new),
                                                     starts, cfg=cfg, max_new_tokens=max_new))
    targets = np.asarray(batch["targets"])
    out = []
    for r in np.flatnonzero(has):
        pred, stopped = cut_at_stop(tokens[r], stop_ids)
        ref, _ = cut_at_stop(targets[r, starts[r]: starts[r] + lengths[r]], stop_ids)
        pred_text, ref_text = decode(pred).strip(), decode(ref).strip()
        out.append(Prediction(pred_text, ref_text, stopped and pred_text == ref_text))
    return out


class ExactMatchEvaluator:
    """`(params, step) -> metrics` over fixed held-out batches per task, for `loop.train`.

    Metrics: `exact_match/<task>` and their mean `exact_match`, plus the teacher-forced
    held-out `loss` (mean over all answer tokens of all tasks).
    """

    def __init__(
        self,
        cfg: NVLMConfig,
        batches: Mapping[str, Sequence[Batch]],
        decode: Callable[[Sequence[int]], str],
        stop_ids: Sequence[int],
    ):
        if not batches:
            raise ValueError("ExactMatchEvaluator needs at least one task with held-out batches")
        self.cfg = cfg
        self.batches = {task: list(bs) for task, bs in batches.items()}
        self.decode = decode
        self.stop_ids = tuple(stop_ids)
        self.last_predictions: dict[str, list[Prediction]] = {}

    def __call__(self, params, step: int) -> dict[str, float]:
        del step
        metrics: dict[str, float] = {}
        loss_sum = count = 0.0
        for task, batches in self.batches.items():
            preds = []
            for batch in batches:
                preds += predict(params, self.cfg, batch, self.decode, self.stop_ids)
                stats = multihost.to_host(multihost.synced_call(_heldout_stats, params, batch, cfg=self.cfg))
                loss_sum += float(stats.loss_sum)
                count += float(stats.count)
            self.last_predictions[task] = preds
            metrics[f"exact_match/{task}"] = float(np.mean([p.correct for p in preds])) if preds else 0.0
        metrics["exact_match"] = float(np.mean([metrics[f"exact_match/{t}"] for t in self.batches]))
        metrics["loss"] = loss_sum / max(count, 1.0)
        return metrics

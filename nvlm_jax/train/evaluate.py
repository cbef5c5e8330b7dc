"""Held-out evaluation during training: exact-match accuracy of greedy answers, per task.

Answers come from the one KV-cache decoder (`nvlm_jax.batch_decode.greedy_batch`), for every arch
(D, X, H): each row is cut after its last prompt token and decoded with its own tiles, the
image context token never generated. The evaluator decodes all its batches with one
`max_new_tokens` (the longest reference answer of any batch) and one prompt width (the longest
prompt, bucketed), so every call reuses one compiled program.

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
import numpy as np

from nvlm_jax.batch_decode import answer_spans, greedy_batch
from nvlm_jax.config import NVLMConfig
from nvlm_jax.generate import PROMPT_BUCKET, cut_at_stop
from nvlm_jax.models import nvlm
from nvlm_jax.models.loss import token_stats
from nvlm_jax.train import multihost

Batch = Mapping[str, np.ndarray]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _heldout_stats(params, batch, *, cfg: NVLMConfig):
    return token_stats(nvlm.apply_batch(params, cfg, batch), batch["targets"], batch["loss_mask"])


@dataclasses.dataclass
class Prediction:
    """One evaluated sample: the decoded prediction, the reference, and whether they match."""

    prediction: str
    reference: str
    correct: bool


def predict(
    params,
    cfg: NVLMConfig,
    batch: Batch,
    decode: Callable[[Sequence[int]], str],
    stop_ids: Sequence[int],
    max_new_tokens: int | None = None,
    prompt_bucket: int = PROMPT_BUCKET,
) -> list[Prediction]:
    """Greedy answers for the rows of `batch` that have an answer (see module docstring).

    `max_new_tokens` defaults to the longest reference answer (its stop token included)."""
    starts, lengths = answer_spans(batch)
    has = lengths > 0
    if not has.any():
        return []
    # With several processes the params span all of them: synced_call compiles before the first
    # collective, and the decoder reads the (possibly sharded) rows back whole on every process,
    # so every process scores every row identically.
    tokens = greedy_batch(params, cfg, batch, max_new_tokens or int(lengths.max()), stop_token_ids=stop_ids,
                          prompt_bucket=prompt_bucket, runner=multihost.synced_call)
    targets = np.asarray(batch["targets"])
    out = []
    for r in np.flatnonzero(has):
        pred, stopped = cut_at_stop(tokens[r], stop_ids)
        ref, _ = cut_at_stop(targets[r, starts[r]: starts[r] + lengths[r]], stop_ids)
        pred_text, ref_text = decode(pred.tolist()).strip(), decode(ref.tolist()).strip()
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
        spans = [answer_spans(b) for bs in self.batches.values() for b in bs]  # also refuses packed rows
        self.max_new_tokens = max([1] + [int(n.max()) for _, n in spans if n.size])
        longest_prompt = max([1] + [int(s.max()) + 1 for s, n in spans if n.size])
        row_width = max(np.shape(b["input_ids"])[1] for bs in self.batches.values() for b in bs)
        # Every prompt fits either width; the smaller one is the prefill's length for every batch.
        self.prompt_bucket = min(-(-longest_prompt // PROMPT_BUCKET) * PROMPT_BUCKET, row_width)

    def __call__(self, params, step: int) -> dict[str, float]:
        del step
        metrics: dict[str, float] = {}
        loss_sum = count = 0.0
        for task, batches in self.batches.items():
            preds = []
            for batch in batches:
                preds += predict(params, self.cfg, batch, self.decode, self.stop_ids, self.max_new_tokens,
                                 self.prompt_bucket)
                stats = multihost.to_host(multihost.synced_call(_heldout_stats, params, batch, cfg=self.cfg))
                loss_sum += float(stats.loss_sum)
                count += float(stats.count)
            self.last_predictions[task] = preds
            metrics[f"exact_match/{task}"] = float(np.mean([p.correct for p in preds])) if preds else 0.0
        metrics["exact_match"] = float(np.mean([metrics[f"exact_match/{t}"] for t in self.batches]))
        metrics["loss"] = loss_sum / max(count, 1.0)
        return metrics

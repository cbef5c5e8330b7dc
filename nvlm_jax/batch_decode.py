"""Answers to training-format rows (`nvlm_jax.data.batch`, one sample per row, the answer as
`loss_mask` targets) from the one KV-cache decoder, `nvlm_jax.generate.generate`: each row is cut
after its last prompt token and decoded greedily with its own tiles and X/H ids. The in-training
evaluation (`train/evaluate.py`) and the main job's question (`train/launch.ask`) use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from nvlm_jax.config import NVLMConfig
from nvlm_jax.generate import PROMPT_BUCKET, Runner, generate


def answer_spans(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(start [B], length [B]) of each row's answer targets (length 0 for rows without one) in
    a training-format batch; `start` is the row's last prompt token (its target is the answer's
    first token).

    Raises ValueError for a packed row (more than one segment) or an answer split in pieces
    (multi-turn), which answering rows does not handle."""
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


def batch_prompts(batch: Mapping[str, np.ndarray], pad_token_id: int = 0) -> dict[str, Any]:
    """`generate` arguments answering each row of a training-format batch (`nvlm_jax.data.batch`,
    one sample per row): row r's prompt is its tokens up to and including its last prompt token
    (see `answer_spans`), with its X/H ids; the tiles stay the batch's per-row
    `[B, T, H, W, 3]` array, so batches of one shape share one compiled program. A row without
    an answer gets a one-token stand-in prompt (`pad_token_id`) and no tiles."""
    starts, lengths = answer_spans(batch)
    has = lengths > 0
    ids, token_image, token_tile = (np.asarray(batch[k], np.int32) for k in ("input_ids", "token_image",
                                                                            "token_tile"))
    standin = np.full(1, -1, np.int32)

    def prompt(x, r, fill):
        return x[r, : starts[r] + 1] if has[r] else np.full_like(standin, fill)

    rows = range(len(ids))
    return dict(
        input_ids=[prompt(ids, r, pad_token_id) for r in rows],
        pixel_values=np.asarray(batch["pixel_values"], np.float32),
        tile_valid=np.asarray(batch["tile_valid"], bool) & has[:, None],
        tile_image=np.asarray(batch["tile_image"], np.int32),
        token_image=[prompt(token_image, r, -1) for r in rows],
        token_tile=[prompt(token_tile, r, -1) for r in rows],
    )


def greedy_batch(
    params,
    cfg: NVLMConfig,
    batch: Mapping[str, np.ndarray],
    max_new_tokens: int | None = None,
    *,
    stop_token_ids: Sequence[int] = (),
    prompt_bucket: int = PROMPT_BUCKET,
    mesh: jax.sharding.Mesh | None = None,
    runner: Runner | None = None,
) -> np.ndarray:
    """Greedy answers, int32 `[B, steps]`, to the rows of a training-format batch (see
    `batch_prompts`; rows without an answer hold arbitrary tokens). The image context token is
    never generated. `max_new_tokens` defaults to the longest answer (its stop token included);
    a row's tokens after its stop token repeat the stop token. For a fixed program over several
    batches, give them one `max_new_tokens` and a `prompt_bucket` at least their longest prompt."""
    _, lengths = answer_spans(batch)
    pad = next(iter(stop_token_ids), 0)  # cut off with the stop token anyway
    out = generate(
        params, cfg, **batch_prompts(batch, pad), max_new_tokens=int(max_new_tokens or max(lengths.max(), 1)),
        stop_token_ids=stop_token_ids, suppress_token_ids=(cfg.image_context_token_id,), pad_token_id=pad,
        mesh=mesh, prompt_bucket=prompt_bucket, runner=runner,
    )
    return out.tokens

"""Choosing the next token: greedy or temperature / top-k / top-p sampling, and the repetition,
frequency and presence penalties. Shared by `generate` and the serving engine; every setting may
be a runtime value (one compiled program for all of them) and differ per row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen.

    Attributes:
      do_sample: False = greedy (argmax); True = sample from the filtered distribution.
      temperature: logits are divided by it before filtering (> 0).
      top_k: keep the k most likely tokens (0 = no limit).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = all).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = SamplingParams()


def sample_logits(
    logits: jax.Array,
    key: jax.Array,
    *,
    do_sample: bool | jax.Array,
    top_k: int | jax.Array = 0,
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """Next tokens [batch] int32 from logits [batch, vocab] (f32).

    do_sample: a Python bool for the whole batch (False: argmax and nothing else is traced) or
    [batch] bools. temperature, top_k (0 = no limit) and top_p (1 = off): scalars or [batch]
    arrays, runtime values, so one compiled program serves every setting. key: one PRNG key for
    the batch, or [batch] keys (each row its own stream, as continuous-batching slots need).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if do_sample is False:
        return greedy
    b, vocab = logits.shape
    sample = jnp.broadcast_to(jnp.asarray(do_sample, bool), (b,))
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))

    def draw(_):
        neg = jnp.finfo(logits.dtype).min
        scaled = logits / jnp.where(sample, temperature, 1.0)[:, None]
        ordered = -jnp.sort(-scaled, axis=-1)  # descending
        k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [b, 1]
        ordered = jnp.where(ordered < kth, neg, ordered)
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the mass before it is below top_p (the first one always).
        keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
        count = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.maximum(jnp.take_along_axis(ordered, count - 1, axis=-1), kth)
        filtered = jnp.where(scaled < threshold, neg, scaled)
        if jnp.ndim(key) == 0:
            drawn = jax.random.categorical(key, filtered, axis=-1)
        else:
            drawn = jax.vmap(lambda k_, row: jax.random.categorical(k_, row))(key, filtered)
        return jnp.where(sample, drawn.astype(jnp.int32), greedy)

    if do_sample is True:
        return draw(None)
    # Rows choose at run time; an all-greedy batch skips the vocabulary sort.
    return jax.lax.cond(jnp.any(sample), draw, lambda _: greedy, None)


def apply_penalties(
    logits: jax.Array,
    counts: jax.Array,
    seen: jax.Array,
    repetition: jax.Array,
    frequency: jax.Array,
    presence: jax.Array,
) -> jax.Array:
    """Penalised logits [batch, vocab]: the repetition penalty (HF/vLLM: a token of the prompt or
    the output has a positive logit divided by it, a negative one multiplied) and OpenAI's
    frequency / presence penalties (minus `frequency · count` and `presence` once, over the
    output's token counts). counts: [batch, vocab] int output counts; seen: [batch, vocab] bool,
    the prompt's tokens; repetition/frequency/presence: [batch]. Neutral values (1, 0, 0) leave
    the logits bit-identical."""
    r = repetition[:, None]
    penalised = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(seen | (counts > 0), penalised, logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)

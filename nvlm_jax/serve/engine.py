"""Continuous batching over the one KV-cache decoder (`nvlm_jax.generate`'s pieces).

The engine owns `max_batch` decode slots and one KV cache `[layers, max_batch, max_len, ...]`.
A request joins at any step: its prompt is prefilled (`prefill_step`, prompt padded on the
right to a power-of-two bucket of at least 64, so a few programs serve every prompt) into a
small cache that is copied into a free slot's row, and its first token is sampled there;
requests admitted at the same step whose prompts share a bucket prefill together, in one
program of a power-of-two group size (the group padded by repeating its last row). Every
step then runs `decode_step` for all slots at once: each slot feeds its last token at its own
position, which is also the cache column it writes (prompts start at column 0), so a slot's
`prompt + max_tokens` must fit `max_len`. Slots that are free compute garbage that nobody reads;
a slot's next occupant overwrites its row (stale columns beyond the new prompt are masked out by
segment id 0). A request leaves at a stop token, a stop string, its token budget, or when it is
cancelled (a client that went away), freeing its slot for the next waiting request.

Nothing recompiles between requests: decode programs exist per cache view (a power of two above
the longest running sequence: a step costs what the running answers need, not the whole context)
and for one or all slots (a lone request steps alone), prefill programs per prompt bucket and
group size (`warmup` compiles the smallest bucket's ahead); sampling settings (temperature,
top-k, top-p, seed, repetition/frequency/presence penalties) are per-slot runtime arrays
(`sample_logits`, `apply_penalties`). Images are encoded once per distinct picture
(`ImageFeatureCache`, keyed by content hash; the ViT runs per tile-count bucket) and the prefill
builds the prompt's image context from the cached projected tokens in a fixed number of tile
slots (`max_images · (max_tiles + 1)` rounded up to a power of two; unused slots are invalid);
for NVLM-X/H each slot's cross-attention memory stays on the device for its decode steps. On a
mesh, the cache and that memory are split by kv head over the tensor axis (`STATE_AXES`).

Requests are served by a background thread (`start`); results arrive as events on the
request's `Handle` (`Delta` text pieces, then one `Finished` or `Failed`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from flax import struct

from nvlm_jax.config import NVLMConfig
from nvlm_jax.generate import decode_step, mesh_context, prefill_step, step_images, tile_bucket
from nvlm_jax.models.llm import init_cache, update_slice
from nvlm_jax.models.nvlm import NVLM, ImageContext, check_image_token_count, thumbnail_slots
from nvlm_jax.sampling import apply_penalties, sample_logits
from nvlm_jax.serve.image_cache import ImageFeatureCache
from nvlm_jax.serve.protocol import Delta, EngineRequest, Event, Failed, Finished, Handle, RequestSampling

MIN_PROMPT_BUCKET = 64

# The engine's device state keeps one layout across every program: the KV cache and the X/H
# cross-attention memory `[layers | groups, slots, len, kv_heads, head_dim]` split by kv head over
# the mesh's tensor axis (a tensor-parallel server holds 1/tensor of them per device, as it does
# the attention weights), everything else (`[slots, ...]`) whole on every device. Left to XLA,
# the first program's output came back in another layout than the state went in, so each
# program compiled twice and warm-up covered neither.
_KV_AXES = (None, None, None, "activation_kv_heads", None)
STATE_AXES = dict(k=_KV_AXES, v=_KV_AXES, memory_k=_KV_AXES, memory_v=_KV_AXES)


def _laid_out(state: dict) -> dict:
    """`state` constrained to `STATE_AXES` (under the model's mesh and rules; else as it is)."""
    def one(name, x):
        return nn.with_logical_constraint(x, STATE_AXES.get(name, (None,) * x.ndim))

    out = {name: one(name, x) for name, x in state.items() if name != "cache"}
    out["cache"] = {name: one(name, x) for name, x in state["cache"].items()}
    return out


@struct.dataclass
class RowSampling:
    """Per-slot sampling settings, all `[slots]` arrays (runtime values of one program)."""

    do_sample: Any
    temperature: Any
    top_k: Any
    top_p: Any
    repetition: Any
    frequency: Any
    presence: Any
    seed: Any
    step: Any


def _choose(logits, counts, seen, rows: RowSampling):
    logits = apply_penalties(logits, counts, seen, rows.repetition, rows.frequency, rows.presence)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(rows.seed, rows.step)
    return sample_logits(logits, keys, do_sample=rows.do_sample, top_k=rows.top_k, temperature=rows.temperature,
                         top_p=rows.top_p)


def _put(buffer, row, slot, axis: int):
    """`buffer` with `row` (size 1 on `axis`) written at index `slot` of that axis, in place."""
    start = [0] * buffer.ndim
    start[axis] = slot
    return update_slice(buffer, row, start)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def _prefill(params, state, slots, ids, length, features, tile_valid, tile_image, token_image, token_tile,
             rows: RowSampling, *, cfg: NVLMConfig):
    """Prefills k prompts `ids [k, P]` (right-padded, `length [k]` real tokens) into slots
    `slots [k]` in one forward and samples each one's first token. Returns (tokens [k], state).
    Rows may repeat (the same prompt into the same slot): a group padded to its size bucket."""
    model, variables = NVLM(cfg), {"params": params}
    k, p = ids.shape
    real = jnp.arange(p)[None] < length[:, None]
    positions, segments = jnp.broadcast_to(jnp.arange(p), (k, p)), real.astype(jnp.int32)
    context = model.apply(variables, ids, None, tile_valid, tile_image, token_tile, features=features,
                          method=NVLM.encode)
    images = dict(image_context=context)
    if cfg.arch in ("X", "H"):
        images.update(token_image=token_image, token_tile=token_tile)
    cache = init_cache(cfg.llm, k, p, jnp.dtype(cfg.dtype))
    logits, cache = prefill_step(model, variables, ids, positions, segments, length - 1, images, cache)
    vocab = logits.shape[-1]
    seen = jnp.zeros((k, vocab), jnp.int32).at[jnp.arange(k)[:, None], ids].add(real.astype(jnp.int32)) > 0
    counts = jnp.zeros((k, vocab), jnp.int32)
    token = _choose(logits, counts, seen, rows)
    counts = counts.at[jnp.arange(k), token].add(1)
    width = state["cache"]["segment_ids"].shape[1]
    wide = {name: jnp.pad(cache[name], ((0, 0), (0, width - p))) for name in ("segment_ids", "positions")}
    new = dict(state)
    new["cache"] = dict(state["cache"])

    def row(x, i, axis):
        return jax.lax.slice_in_dim(x, i, i + 1, axis=axis)

    for i in range(k):  # k is a small static bucket
        slot = slots[i]
        for name in ("k", "v"):
            new["cache"][name] = _put(new["cache"][name], row(cache[name], i, 1), slot, 1)
        for name in ("segment_ids", "positions"):
            new["cache"][name] = _put(new["cache"][name], row(wide[name], i, 0), slot, 0)
        new["counts"] = _put(new["counts"], row(counts, i, 0), slot, 0)
        new["seen"] = _put(new["seen"], row(seen, i, 0), slot, 0)
        if cfg.arch in ("X", "H"):
            for name in ("memory_k", "memory_v"):
                new[name] = _put(new[name], row(getattr(context, name), i, 1), slot, 1)
            for name in ("memory_image", "memory_tile"):
                new[name] = _put(new[name], row(getattr(context, name), i, 0), slot, 0)
            new["new_image"] = new["new_image"].at[slot].set(jnp.max(token_image[i]))
    return token, _laid_out(new)


@functools.partial(jax.jit, static_argnames=("cfg", "view"), donate_argnames=("state",))
def _decode(params, state, tokens, positions, active, rows: RowSampling, *, cfg: NVLMConfig, view: int):
    """One step of the first `b` slots: tokens / positions / active `[b]`, b <= slots (slots
    are filled lowest first: a lone request is in slot 0). Returns (tokens, state).

    Attention covers the first `view` cache columns only (every active slot's position is
    below it): a step costs what the running answers need, not the whole context or every slot.
    """
    model, variables = NVLM(cfg), {"params": params}
    b = tokens.shape[0]
    # Batch-major state (cache rows, counts, X/H memory rows) cut to the first b slots.
    batch_axis = dict(memory_k=1, memory_v=1)
    part = {name: jax.lax.slice_in_dim(x, 0, b, axis=batch_axis.get(name, 0))
            for name, x in state.items() if name != "cache"}
    full = state["cache"]
    # The whole k/v stacks go in (each layer reads its first b rows and `view` columns in place,
    # `LLM`); only the small [b, view] segment-id / position rows are cut out. Cutting out a
    # k/v window and writing it back cost two copies of it per step (at view 256 on the 126M
    # model, more than the weights' products; BUILD_NOTES).
    cache = dict(k=full["k"], v=full["v"], segment_ids=full["segment_ids"][:b, :view],
                 positions=full["positions"][:b, :view])
    context = None
    if cfg.arch in ("X", "H"):
        context = ImageContext(memory_k=part["memory_k"], memory_v=part["memory_v"],
                               memory_image=part["memory_image"], memory_tile=part["memory_tile"])
    images = step_images(cfg, context, part.get("new_image"))
    logits, cache = decode_step(model, variables, tokens, positions, cache, positions, images)
    new = _choose(logits, part["counts"], part["seen"], rows)
    counts = part["counts"].at[jnp.arange(b), new].add(active.astype(jnp.int32))
    out = dict(state, counts=jax.lax.dynamic_update_slice(state["counts"], counts, (0, 0)))
    out["cache"] = dict(cache, **{name: jax.lax.dynamic_update_slice(full[name], cache[name], (0, 0))
                                  for name in ("segment_ids", "positions")})
    return new, _laid_out(out)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_images(params, pixels, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, pixels, method=NVLM.encode_images)


@dataclasses.dataclass
class _Prompt:
    """One admitted request's prefill row: ids [1, P], its tiles' features [1, T, n, E], ...
    (`entry` None: a warm-up placeholder, sampled with default settings)."""

    entry: _Slot | None
    length: int
    ids: np.ndarray
    features: jax.Array
    valid: np.ndarray
    tile_image: np.ndarray
    token_image: np.ndarray | None
    token_tile: np.ndarray | None


@dataclasses.dataclass
class _Slot:
    handle: Handle
    position: int  # where the last token is fed (= its cache column)
    last: int
    sampling: RequestSampling
    seed: int
    generated: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of answer text already emitted
    started: float = dataclasses.field(default_factory=time.monotonic)


class Engine:
    """Continuous batching for one loaded model (`NVLMModel`).

    Args:
      model: the model (its params, config, tokenizer, prompt format and mesh are used).
      max_batch: decode slots.
      max_len: cache columns per slot = the longest prompt + answer (default and limit: the
        model's `max_position_embeddings`).
      image_cache_size: images whose projected tokens are kept (0 = none).
      max_images: NVLM-X/H: images per prompt the per-slot cross-attention memory holds.
    """

    def __init__(self, model, *, max_batch: int = 8, max_len: int | None = None, image_cache_size: int = 64,
                 max_images: int = 4):
        cfg = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        limit = cfg.llm.max_position_embeddings
        if max_len is not None and not 1 < max_len <= limit:
            raise ValueError(f"max_len must be in [2, {limit}] (the model's max_position_embeddings), got {max_len}")
        self.model, self.cfg = model, cfg
        self.max_batch, self.max_len, self.max_images = max_batch, max_len or limit, max_images
        fmt = model.prompt_format
        self.memory_tiles = tile_bucket(max_images * (fmt.max_tiles + int(fmt.use_thumbnail)))
        self.images = ImageFeatureCache(image_cache_size)
        self._slots: list[_Slot | None] = [None] * max_batch
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._rng = np.random.default_rng()
        self.counters = collections.Counter()
        with mesh_context(model.mesh, model.rules):
            self._state = self._initial_state()

    # ---- public ----

    def check(self, request: EngineRequest) -> None:
        """Raises ValueError naming what does not fit (length, images, ids)."""
        n = int(np.asarray(request.input_ids).size)
        if n == 0:
            raise ValueError("the prompt is empty")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if n + request.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({n} tokens) + max_tokens ({request.max_tokens}) exceeds the context "
                             f"({self.max_len} tokens)")
        if self.cfg.arch in ("X", "H"):
            if len(request.images) > self.max_images:
                raise ValueError(f"{len(request.images)} images exceed this server's {self.max_images} per prompt")
            if request.token_image is None or request.token_tile is None or request.tile_image is None:
                raise ValueError(f"NVLM-{self.cfg.arch} requests need token_image, token_tile and tile_image")

    def submit(self, request: EngineRequest, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queues a request (checked first: ValueError) and returns its handle."""
        self.check(request)
        handle = Handle(request, on_event)
        handle._engine = self
        with self._cond:
            self._waiting.append(handle)
            self.counters["requests"] += 1
            self._cond.notify()
        return handle

    def start(self, warmup: bool = False) -> Engine:
        """Serves requests on a background (daemon) thread; `warmup` first compiles what the
        first requests would otherwise wait for (`warmup`)."""
        if warmup and self._thread is None:
            self.warmup()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nvlm-engine", daemon=True)
            self._thread.start()
        return self

    def warmup(self) -> None:
        """Compiles the prefill program of every group size (1, 2, 4, ... up to `max_batch`) at
        the smallest prompt bucket and the decode programs (one slot alone, all slots) at the
        smallest cache view, on placeholder rows; the state is reset afterwards. Longer prompts'
        buckets still compile on first use."""
        cfg, t = self.cfg, self.memory_tiles
        p = min(MIN_PROMPT_BUCKET, self.max_len)
        cross = np.full((1, p), -1, np.int32) if cfg.arch in ("X", "H") else None
        placeholder = _Prompt(None, 1, np.zeros((1, p), np.int32), self._no_features(t), np.zeros((1, t), bool),
                              np.full((1, t), -1, np.int32), cross, cross)
        sizes = sorted({1 << (n - 1).bit_length() for n in range(1, self.max_batch + 1)})  # as `_admit` pads
        for k in sizes:
            self._prefill_rows([(i % self.max_batch, placeholder) for i in range(k)])
        with mesh_context(self.model.mesh, self.model.rules):
            for b in sorted({1, self.max_batch}):
                zeros = np.zeros((b,), np.int32)
                _, self._state = _decode(self.model.params, self._state, zeros, zeros, np.zeros((b,), bool),
                                         self._rows([None] * b), cfg=cfg, view=self._view(0))
            self._state = self._initial_state()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        """Whether the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def metrics(self) -> dict[str, int]:
        """Counters and gauges for `/metrics` (slots, queue, tokens, image cache)."""
        stats = self.images.stats()
        with self._cond:
            running = sum(s is not None for s in self._slots)
            waiting = len(self._waiting)
        return dict(self.counters, running=running, waiting=waiting, slots=self.max_batch,
                    image_cache_hits=stats.hits, image_cache_misses=stats.misses,
                    image_cache_evictions=stats.evictions, image_cache_size=stats.size)

    # ---- device state ----

    def _initial_state(self) -> dict:
        """Empty slots, built on the devices in their `STATE_AXES` layout (run under the
        model's mesh context)."""
        return jax.jit(lambda: _laid_out(self._empty_state()))()

    def _empty_state(self) -> dict:
        cfg, b = self.cfg, self.max_batch
        vocab = cfg.llm.vocab_size
        state = dict(cache=init_cache(cfg.llm, b, self.max_len, jnp.dtype(cfg.dtype)),
                     counts=jnp.zeros((b, vocab), jnp.int32), seen=jnp.zeros((b, vocab), bool))
        if cfg.arch in ("X", "H"):
            t = self.memory_tiles
            shapes = jax.eval_shape(
                lambda p: NVLM(cfg).apply({"params": p}, jnp.zeros((1, 1), jnp.int32), None, jnp.zeros((1, t), bool),
                                          jnp.zeros((1, t), jnp.int32), jnp.full((1, 1), -1, jnp.int32),
                                          features=self._no_features(t), method=NVLM.encode),
                self.model.params)
            for name in ("memory_k", "memory_v"):
                shape = list(getattr(shapes, name).shape)
                shape[1] = b
                state[name] = jnp.zeros(shape, getattr(shapes, name).dtype)
            for name in ("memory_image", "memory_tile"):
                state[name] = jnp.full((b, getattr(shapes, name).shape[1]), -1, jnp.int32)
            state["new_image"] = jnp.full((b,), -1, jnp.int32)
        return state

    def _no_features(self, tiles: int):
        c = self.cfg
        return jnp.zeros((1, tiles, c.num_image_tokens, c.llm.hidden_size), jnp.dtype(c.dtype))

    def _features(self, request: EngineRequest):
        """(features [1, T, n, E], tile_valid [1, T], tile_image [1, T]) of the prompt's tiles
        in `T = memory_tiles` slots (one prefill program per prompt bucket, whatever the
        images), each image's projected tokens taken from the cache or computed once."""
        per_image, counts = [], []
        for image in request.images:
            feats = self.images.get(image.key)
            if feats is None:
                if image.pixels is None:
                    raise ValueError(f"image {image.key[:12]} is no longer cached and came without pixels")
                pixels = np.asarray(image.pixels, np.float32)
                n = pixels.shape[0]
                padded = np.zeros((tile_bucket(n),) + pixels.shape[1:], np.float32)
                padded[:n] = pixels
                feats = _encode_images(self.model.params, padded, cfg=self.cfg)[:n]
                self.images.put(image.key, feats)
                self.counters["images_encoded"] += 1
            per_image.append(feats)
            counts.append(int(feats.shape[0]))
        total = sum(counts)
        t = self.memory_tiles
        if total > t:
            raise ValueError(f"the prompt's images have {total} tiles; at most {t} fit")
        features = self._no_features(t)
        if total:
            features = features.at[0, :total].set(jnp.concatenate(per_image).astype(features.dtype))
        valid = np.arange(t)[None] < total
        tile_image = np.full((1, t), -1, np.int32)
        tile_image[0, :total] = np.repeat(np.arange(len(counts)), counts)
        return features, valid, tile_image

    def _prepare(self, handle: Handle) -> _Prompt:
        """A waiting request's prefill inputs (one row each); ValueError for a prompt this model
        cannot take."""
        request, cfg = handle.request, self.cfg
        ids = np.asarray(request.input_ids, np.int32)
        n = ids.size
        p = min(max(MIN_PROMPT_BUCKET, 1 << (n - 1).bit_length()), self.max_len)
        features, valid, tile_image = self._features(request)
        in_decoder = int(valid.sum()) if cfg.arch == "D" else 0
        if cfg.arch == "H":
            in_decoder = int(np.asarray(thumbnail_slots(jnp.asarray(valid), jnp.asarray(tile_image))).sum())
        check_image_token_count(cfg, ids, in_decoder)
        row_ids = np.zeros((1, p), np.int32)
        row_ids[0, :n] = ids
        token_image = token_tile = None
        if cfg.arch in ("X", "H"):
            token_image, token_tile = np.full((1, p), -1, np.int32), np.full((1, p), -1, np.int32)
            token_image[0, :n], token_tile[0, :n] = request.token_image, request.token_tile
        s = request.sampling
        seed = int(self._rng.integers(2**32)) if s.seed is None else s.seed
        entry = _Slot(handle, position=n, last=-1, sampling=s, seed=seed)
        return _Prompt(entry, n, row_ids, features, valid, tile_image, token_image, token_tile)

    def _admit(self, group: Sequence[tuple[int, _Prompt]]) -> None:
        """Prefills `(slot, prompt)` pairs of one prompt bucket in one program (the group padded
        to a power of two by repeating its last row), then takes each one's first token."""
        size = 1 << (len(group) - 1).bit_length()
        tokens = self._prefill_rows(list(group) + [group[-1]] * (size - len(group)))
        self.counters["prefill_calls"] += 1
        for i, (slot, prompt) in enumerate(group):
            self.counters["prompt_tokens"] += prompt.length
            self._slots[slot] = prompt.entry
            prompt.entry.position = prompt.length - 1  # `_accept` moves it to the first answer token's column
            self._accept(slot, int(tokens[i]))

    def _prefill_rows(self, rows: Sequence[tuple[int, _Prompt]]) -> np.ndarray:
        """Runs `_prefill` on `(slot, prompt)` rows of one prompt bucket; their first tokens."""
        prompts = [prompt for _, prompt in rows]

        def stack(name):
            parts = [getattr(q, name) for q in prompts]
            return None if parts[0] is None else np.concatenate([np.asarray(x) for x in parts])

        sampling = self._rows([q.entry for q in prompts], steps=[0] * len(prompts))
        features = jnp.concatenate([q.features for q in prompts])
        with mesh_context(self.model.mesh, self.model.rules):
            tokens, self._state = _prefill(
                self.model.params, self._state, np.asarray([slot for slot, _ in rows], np.int32), stack("ids"),
                np.asarray([q.length for q in prompts], np.int32), features, stack("valid"), stack("tile_image"),
                stack("token_image"), stack("token_tile"), sampling, cfg=self.cfg)
        return np.asarray(tokens)

    def _rows(self, slots: Sequence[_Slot | None], steps: Sequence[int] | None = None) -> RowSampling:
        def col(fn, dtype):
            return np.asarray([fn(s) if s is not None else fn(None) for s in slots], dtype)

        def get(name, default):
            return lambda s: default if s is None else getattr(s.sampling, name)

        if steps is None:
            steps = [0 if s is None else len(s.generated) for s in slots]
        return RowSampling(
            do_sample=col(lambda s: s is not None and s.sampling.temperature > 0, bool),
            temperature=col(lambda s: 1.0 if s is None or s.sampling.temperature == 0 else s.sampling.temperature,
                            np.float32),
            top_k=col(get("top_k", 0), np.int32), top_p=col(get("top_p", 1.0), np.float32),
            repetition=col(get("repetition_penalty", 1.0), np.float32),
            frequency=col(get("frequency_penalty", 0.0), np.float32),
            presence=col(get("presence_penalty", 0.0), np.float32),
            seed=col(lambda s: 0 if s is None else s.seed, np.uint32), step=np.asarray(steps, np.int32),
        )

    # ---- host side of a step ----

    def _accept(self, slot: int, token: int) -> None:
        """Takes slot `slot`'s new token: stop checks, text, events; frees the slot when done."""
        entry = self._slots[slot]
        request = entry.handle.request
        tokenizer = self.model.tokenizer
        reason = None
        if token in request.stop_token_ids:
            reason = "stop"
        else:
            entry.generated.append(token)
            entry.last, entry.position = token, entry.position + 1
            self.counters["generated_tokens"] += 1
        text = tokenizer.decode(entry.generated, skip_special_tokens=True)
        if request.stop:
            hits = [i for i in (text.find(s, max(0, entry.sent - len(s))) for s in request.stop) if i >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
        if reason is None and len(entry.generated) >= request.max_tokens:
            reason = "length"
        if reason is None:
            # Hold back what may be the start of a stop string or an unfinished character.
            hold = max((len(s) - 1 for s in request.stop), default=0)
            safe = len(text) - hold
            while safe > entry.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            if safe > entry.sent:
                entry.handle.emit(Delta(text[entry.sent : safe]))
                entry.sent = safe
            return
        if len(text) > entry.sent:
            entry.handle.emit(Delta(text[entry.sent :]))
        self._finish(slot, Finished(reason, text, tuple(entry.generated), int(np.asarray(request.input_ids).size)))

    def _finish(self, slot: int, event: Event) -> None:
        entry = self._slots[slot]
        self._slots[slot] = None
        self.counters[f"finished_{event.reason}" if isinstance(event, Finished) else "failed"] += 1
        entry.handle.emit(event)

    def _step(self) -> None:
        # A lone request in slot 0 steps alone (as fast as `generate` at batch 1); otherwise
        # every slot steps (two programs per cache view, not one per number of running slots).
        alone = all(s is None for s in self._slots[1:])
        slots = self._slots[:1] if alone else self._slots
        active = [s is not None for s in slots]
        tokens = np.asarray([s.last if s is not None else 0 for s in slots], np.int32)
        positions = np.asarray([s.position if s is not None else 0 for s in slots], np.int32)
        rows = self._rows(slots)
        with mesh_context(self.model.mesh, self.model.rules):
            new, self._state = _decode(self.model.params, self._state, tokens, positions, np.asarray(active), rows,
                                       cfg=self.cfg, view=self._view(int(positions.max())))
        new = np.asarray(new)
        self.counters["decode_steps"] += 1
        for i, is_active in enumerate(active):
            if is_active:
                self._accept(i, int(new[i]))

    def _view(self, position: int) -> int:
        """Cache columns a step attends to: a power of two (at least 64) above `position`."""
        return min(self.max_len, max(MIN_PROMPT_BUCKET, 1 << position.bit_length()))

    def _drop_cancelled(self) -> None:
        for i, entry in enumerate(self._slots):
            if entry is not None and entry.handle.cancelled:
                self._finish(i, Finished("cancelled", "", tuple(entry.generated),
                                         int(np.asarray(entry.handle.request.input_ids).size)))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stop:
                    return
                admit = []
                free = [i for i, s in enumerate(self._slots) if s is None]
                while self._waiting and len(admit) < len(free):
                    handle = self._waiting.popleft()
                    if not handle.cancelled:
                        admit.append((handle, free[len(admit)]))
            try:
                self._drop_cancelled()
                by_bucket: dict[int, list[tuple[int, _Prompt]]] = collections.defaultdict(list)
                for handle, slot in admit:
                    try:
                        prompt = self._prepare(handle)
                    except ValueError as e:  # a request the model cannot take: only it fails
                        self.counters["failed"] += 1
                        handle.emit(Failed(str(e)))
                        continue
                    by_bucket[prompt.ids.shape[1]].append((slot, prompt))
                for group in by_bucket.values():  # requests that arrived together prefill together
                    self._admit(group)
                if any(s is not None for s in self._slots):
                    self._step()
            except Exception as e:  # noqa: BLE001 - the engine must outlive one broken step
                logging.exception("engine step failed")
                for i, entry in enumerate(self._slots):
                    if entry is not None:
                        self._finish(i, Failed(f"internal error: {type(e).__name__}: {e}", 500))
                with mesh_context(self.model.mesh, self.model.rules):
                    self._state = self._initial_state()

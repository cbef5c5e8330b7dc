"""What goes into the serving engine and what comes out: a request (`EngineRequest` with its
`RequestSampling` and `ImageInput`s), its `Handle`, and the events on it (`Delta` text pieces,
then one `Finished` or `Failed`).
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class RequestSampling:
    """How one request chooses its tokens (OpenAI / vLLM semantics).

    temperature: 0 = greedy; top_k: 0 = no limit; top_p: 1 = off; seed: None = a fresh random
    one; repetition_penalty: 1 = off (> 1 discourages tokens of the prompt and output);
    frequency_penalty / presence_penalty: 0 = off, in [-2, 2].
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        checks = [
            (0 <= self.temperature <= 100, "temperature must be in [0, 100]"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = no limit)"),
            (self.seed is None or 0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (0 < self.repetition_penalty <= 10, "repetition_penalty must be in (0, 10]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its content key (`image_cache.content_key`) and its tiles
    `[tiles, H, W, 3]` f32 (may be None when the key is known to be cached)."""

    key: str
    pixels: np.ndarray | None


@dataclasses.dataclass(frozen=True, eq=False)
class EngineRequest:
    """One prompt to answer.

    input_ids: `[n]` int32 (image context tokens in place); images: in prompt order;
    token_image / token_tile `[n]` and tile_image `[tiles]`: NVLM-X/H ids
    (`processing.prompt.cross_attention_ids`), None for D; max_tokens: the answer's budget;
    stop: strings that end the answer (not included); stop_token_ids: tokens that end it.
    """

    input_ids: np.ndarray
    images: tuple[ImageInput, ...] = ()
    token_image: np.ndarray | None = None
    token_tile: np.ndarray | None = None
    tile_image: np.ndarray | None = None
    max_tokens: int = 16
    sampling: RequestSampling = RequestSampling()
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delta:
    """New answer text (possibly empty at the start of a stream)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of an answer: reason "stop" (stop token or string), "length" or "cancelled";
    text and token_ids: the whole answer (stop token excluded; token_ids uncut by stop strings)."""

    reason: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    """A request the engine could not answer: status 400 (the request) or 500 (the engine)."""

    message: str
    status: int = 400


Event = Delta | Finished | Failed


class Handle:
    """A submitted request: iterate it for its events (blocking), or pass `on_event` to
    `Engine.submit` to receive them on the engine's thread; `cancel()` frees its slot."""

    def __init__(self, request: EngineRequest, on_event: Callable[[Event], None] | None):
        self.request = request
        self.cancelled = False
        self._queue: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event or self._queue.put
        self._engine: Any = None  # set by Engine.submit

    def emit(self, event: Event) -> None:
        self._on_event(event)

    def cancel(self) -> None:
        self.cancelled = True
        if self._engine is not None:
            self._engine.wake()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._queue.get()
            yield event
            if not isinstance(event, Delta):
                return

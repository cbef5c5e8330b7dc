"""Projected image tokens cached by image content, so a picture asked about twice is encoded once.

Keys are the sha256 of the image's bytes (plus nothing else: one cache belongs to one model and
one tiling rule). Values are the device arrays `[tiles, tokens_per_tile, llm_hidden]` that
`NVLM.encode_images` returns for the image's tiles. The cache is bounded by a number of images
and evicts the least recently used one; hits, misses and evictions are counted for `/metrics`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from typing import Any


def content_key(data: bytes) -> str:
    """The cache key of an image's bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    size: int = 0


class ImageFeatureCache:
    """A thread-safe LRU map from image content keys to projected image tokens.

    capacity: the most images kept (0 disables caching: every lookup is a miss).
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"image cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stats = CacheStats()

    def get(self, key: str) -> Any | None:
        """The cached features of `key` (counted as a hit), or None (a miss)."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return value

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            if self.capacity == 0:
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self._stats.evictions += 1

    def stats(self) -> CacheStats:
        with self._lock:
            return dataclasses.replace(self._stats, size=len(self._entries))

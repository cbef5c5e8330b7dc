"""A progress counter for conversions (tensors and bytes), drawing a tqdm bar when enabled."""

from __future__ import annotations

import threading


class Progress:
    """Counts converted tensors and bytes; draws a tqdm bar (created on first use) when enabled."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool, desc: str):
        self.total_tensors, self.total_bytes, self.tensors = total_tensors, total_bytes, 0
        self.enabled, self.desc = enabled, desc
        self._lock = threading.Lock()
        self._bar = None

    def update(self, nbytes: int) -> None:
        with self._lock:
            self.tensors += 1
            if not self.enabled:
                return
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc)
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None



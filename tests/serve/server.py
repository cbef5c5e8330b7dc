"""Test helpers: a uvicorn server on a free localhost port in this process, raw HTTP calls,
and images as data URLs."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import uvicorn
from PIL import Image

from nvlm_jax.serve.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine, limits=None, model_name: str = "nvlm"):
    """Serves `engine` (started) on 127.0.0.1; yields the base URL `http://127.0.0.1:PORT`."""
    port = free_port()
    config = uvicorn.Config(create_app(engine, model_name=model_name, limits=limits), host="127.0.0.1", port=port,
                            log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def http(url: str, body: bytes | dict | None = None, timeout: float = 120) -> tuple[int, str]:
    """(status, body text) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(base: str) -> dict[str, float]:
    _, text = http(f"{base}/metrics")
    return {name: float(value) for name, value in (line.split() for line in text.splitlines() if line)}


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(im: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(im)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}

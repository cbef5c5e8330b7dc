"""OpenAI chat-completions requests: parsing, validation, images, and the engine request.

Every problem is a `RequestError` with an HTTP status and a one-line reason naming the field
(`messages[1].content[0].image_url`, `max_tokens`, ...). Supported: `messages` (system /
developer, user, assistant turns; content as a string or `text` / `image_url` parts), `model`,
`max_tokens` (or `max_completion_tokens`), `temperature` (0 = greedy), `top_p`, `top_k` (vLLM
extension; 0 or -1 = off), `seed`, `stop` (a string or up to 4), `repetition_penalty` (vLLM),
`frequency_penalty`, `presence_penalty`, `n` (1 only), `stream`, `stream_options.include_usage`.

Images: `data:` URLs (base64), local files only under `image_root` (`file://` URLs or plain
paths, real paths checked, symlinks resolved), and http(s) URLs only with `allow_remote_images`.
Each image's pixel count is checked from its header against `max_image_pixels` before decoding.
As vLLM does for most models, a user turn's images go before its text, one `<image>\\n` each,
which is exactly what `model.chat` renders for a question with images.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
import urllib.request
from typing import Any

import numpy as np

from nvlm_jax.processing import get_special_tokens, tiling
from nvlm_jax.processing.chat_template import IMAGE
from nvlm_jax.processing.prompt import cross_attention_ids
from nvlm_jax.serve.image_cache import content_key
from nvlm_jax.serve.protocol import EngineRequest, ImageInput, RequestSampling

MAX_REMOTE_BYTES = 32 << 20


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx) and a one-line `message`."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(" ".join(str(message).split()))
        self.status, self.code = status, code


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts (the CLI's flags)."""

    max_image_pixels: int = 36_000_000
    limit_images_per_prompt: int = 4
    image_root: str | None = None
    allow_remote_images: bool = False


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A parsed request. history: earlier (question, answer) turns; question and history
    questions are list-form content (`IMAGE` slots); image_urls in prompt order."""

    model: str
    system: str | None
    has_system: bool
    history: tuple[tuple[list, str], ...]
    question: list
    image_urls: tuple[str, ...]
    max_tokens: int | None
    sampling: RequestSampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _text_of(content: Any, where: str) -> str:
    """A string content, or the text of text-only parts."""
    if isinstance(content, str):
        return content
    texts, images = _parts(content, where)
    if images:
        raise RequestError(f"{where}: only user messages may hold images")
    return "\n".join(texts)


def _parts(content: Any, where: str) -> tuple[list[str], list[str]]:
    """(texts, image urls) of a content string or part list."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where} must be a string or a non-empty list of parts")
    texts, urls = [], []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise RequestError(f"{at}.image_url must hold a url string")
            urls.append(url)
        else:
            raise RequestError(f"{at} must be a {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}} part")
    return texts, urls


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Parses and validates the JSON body of `/v1/chat/completions` (RequestError if bad)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise RequestError("n must be 1")
    if body.get("logprobs"):
        raise RequestError("logprobs are not supported")
    system, has_system, turns = None, False, []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "content" not in message:
            raise RequestError(f"{where} must be an object with role and content")
        role = message.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise RequestError(f"{where}: a system message may only come first")
            system, has_system = _text_of(message["content"], f"{where}.content"), True
        elif role in ("user", "assistant"):
            turns.append((role, message["content"], where))
        else:
            raise RequestError(f"{where}.role must be system, user or assistant, got {json.dumps(role)}")
    roles = [r for r, _, _ in turns]
    if not roles or roles[-1] != "user" or any(r != ("user" if k % 2 == 0 else "assistant")
                                               for k, r in enumerate(roles)):
        raise RequestError("messages must alternate user and assistant turns (after an optional system message) "
                           "and end with a user turn")
    urls, contents = [], []
    for role, content, where in turns:
        if role == "assistant":
            contents.append(_text_of(content, f"{where}.content"))
            continue
        texts, images = _parts(content, f"{where}.content")
        urls.extend(images)
        contents.append([part for _ in images for part in (IMAGE, "\n")] + ["\n".join(texts)])
    history = tuple((contents[k], contents[k + 1]) for k in range(0, len(contents) - 1, 2))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 2**31 - 1, integer=True)
    top_k = _number(body, "top_k", 0, -1, 2**31 - 1, integer=True)
    sampling = RequestSampling(
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1)),
        top_k=max(top_k, 0),
        seed=_number(body, "seed", None, 0, 2**32 - 1, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 1e-3, 10)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -2, 2)),
    )
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is None:
        stop = ()
    if (not isinstance(stop, list | tuple) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError("stop must be a non-empty string or a list of up to 4 non-empty strings")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise RequestError("stream must be true or false and stream_options an object")
    return ChatRequest(model, system, has_system, history, contents[-1], tuple(urls), max_tokens, sampling,
                       tuple(stop), stream, bool(options.get("include_usage", False)))


def read_image_bytes(url: str, limits: Limits, where: str) -> bytes:
    """The encoded bytes an image URL names (data URL, local file under the root, remote URL)."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(f"{where}: a data URL must be data:<type>;base64,<data>")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{where}: bad base64 in the data URL ({e})") from None
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise RequestError(f"{where}: remote image URLs are refused (start the server with --allow_remote_images)")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http(s) only, opted in
                data = response.read(MAX_REMOTE_BYTES + 1)
        except OSError as e:
            raise RequestError(f"{where}: could not fetch {url}: {e}") from None
        if len(data) > MAX_REMOTE_BYTES:
            raise RequestError(f"{where}: {url} is larger than {MAX_REMOTE_BYTES} bytes")
        return data
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path:
        raise RequestError(f"{where}: unsupported URL scheme in {url[:40]!r}")
    if limits.image_root is None:
        raise RequestError(f"{where}: local image paths are refused (start the server with --image_root)")
    root = os.path.realpath(limits.image_root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise RequestError(f"{where}: {path} is outside the image root")
    if not os.path.isfile(real):
        raise RequestError(f"{where}: {path}: no such file under the image root")
    with open(real, "rb") as f:
        return f.read()


def build_engine_request(model, chat: ChatRequest, limits: Limits, max_len: int) -> EngineRequest:
    """The engine request of a parsed chat request: images read, checked and tiled (by the
    model's prompt format), the prompt encoded by the one prompt encoder (`model.encode`).
    `max_tokens` defaults to the rest of the context (`max_len` tokens)."""
    if len(chat.image_urls) > limits.limit_images_per_prompt:
        raise RequestError(f"too many images: {len(chat.image_urls)} > --limit_images_per_prompt "
                           f"{limits.limit_images_per_prompt}")
    images, num_tiles, grids = [], [], []
    for i, url in enumerate(chat.image_urls):
        where = f"image {i + 1}"
        data = read_image_bytes(url, limits, where)
        try:
            image = tiling.open_image(data, source_name=where, max_pixels=limits.max_image_pixels)
        except ValueError as e:
            raise RequestError(str(e).splitlines()[0]) from None
        pixels, tiles, grid = model.tile_images([image])
        key = content_key(data)
        images.append(ImageInput(key, pixels))
        num_tiles.append(tiles[0])
        grids.append(grid[0])
    kwargs = {} if not chat.has_system else {"system_message": chat.system}
    try:
        prompt = model.encode(chat.question, num_tiles, list(chat.history) or None, grids=grids, **kwargs)
    except ValueError as e:
        raise RequestError(f"messages: {e}") from None
    n = int(prompt.input_ids.size)
    if n >= max_len:
        raise RequestError(f"the prompt has {n} tokens; the context holds {max_len}, leaving no room for an answer")
    max_tokens = chat.max_tokens if chat.max_tokens is not None else max_len - n
    if n + max_tokens > max_len:
        raise RequestError(f"the prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context ({max_len} "
                           "tokens)")
    special = get_special_tokens(model.tokenizer)
    cross = cross_attention_ids(prompt) if model.config.arch in ("X", "H") else None
    return EngineRequest(
        input_ids=np.asarray(prompt.input_ids, np.int32), images=tuple(images),
        token_image=None if cross is None else cross.token_image,
        token_tile=None if cross is None else cross.token_tile,
        tile_image=None if cross is None else cross.tile_image,
        max_tokens=max_tokens, sampling=chat.sampling, stop=chat.stop, stop_token_ids=(special.im_end,),
    )

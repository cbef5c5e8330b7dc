"""Record formats of user datasets -> the canonical record the parsers read.

Canonical: `{"conversations": [{"from": role, "value": str}, ...], "images": [ref, ...]}`.
Accepted record formats (`RECORD_FORMATS`; "auto" picks one per record from its keys, and reads
turns with content parts as messages under either key):

* "llava": `{"image": ref | [refs], "conversations": [{"from": "human"|"gpt", "value": ...}]}`,
  `<image>` placeholders in the user turns.
* "sharegpt": LLaVA turns plus ShareGPT / LLaMA-Factory fields: a top-level `"system"` string
  (becomes a leading system turn), `"images"`, and the `"chatgpt"`/`"bing"`/`"bard"` speaker
  names of ShareGPT dumps (assistant turns).
* "messages": OpenAI / Hugging Face chat, `{"messages": [{"role": ..., "content": ...}],
  "images": [refs]}`, where `content` is a string (with `<image>` placeholders, as LLaVA) or a
  list of parts: `{"type": "text", "text": str}`, `{"type": "image"}` (its image inline under
  "image" / "url" / "path", else the next of the top-level "images"), `{"type": "image_url",
  "image_url": {"url": str} | str}`. A list is joined with newlines, each image part becoming
  `<image>`: `[image, text "What colour?"]` reads as LLaVA's `"<image>\\nWhat colour?"`.

Image references that are URLs (`image_from_url`): `data:` URLs are decoded to bytes, `file://`
URLs become paths (still confined to the source's image root by `parsing.resolve_image_path`),
any other scheme (`http(s)://`, `gs://`, ...) is never fetched: the record is skipped as
remote_image. Every problem is a `RecordProblem` carrying a skip reason.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from nvlm_jax.data.transforms import IMAGE_PLACEHOLDER_MISMATCH, MALFORMED_RECORD, REMOTE_IMAGE
from nvlm_jax.processing.chat_template import IMAGE_PLACEHOLDER

RECORD_FORMATS = ("auto", "llava", "sharegpt", "messages")
_SHAREGPT_ASSISTANTS = frozenset({"chatgpt", "bing", "bard"})
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class RecordProblem(ValueError):
    """A record that cannot be used; `reason` is its skip reason (`transforms.SKIP_REASONS`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def check_record_format(record_format: str) -> str:
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record format must be one of {RECORD_FORMATS}, got {record_format!r}")
    return record_format


def image_from_url(ref: str) -> str | bytes:
    """A string image reference as the loader takes it: `data:` URL -> its bytes, `file://` URL
    -> its path, a plain path unchanged; `RecordProblem` (remote_image) for other URL schemes,
    (malformed_record) for a broken `data:` URL or a `file://` URL naming a host."""
    if ref[:5].lower() == "data:":
        header, sep, payload = ref[5:].partition(",")
        if not sep:
            raise RecordProblem(MALFORMED_RECORD, "data: URL without a ',' before its payload")
        if header.lower().endswith(";base64"):
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RecordProblem(MALFORMED_RECORD, f"data: URL with invalid base64: {e}") from None
        return urllib.parse.unquote_to_bytes(payload)
    match = _URL_SCHEME.match(ref)
    if match is None:
        return ref
    if match.group(1).lower() != "file":
        raise RecordProblem(REMOTE_IMAGE, f"image URL {ref[:200]!r} is not fetched (only data: and file:// URLs "
                                          "are read; download it under the image root)")
    parsed = urllib.parse.urlparse(ref)
    if parsed.netloc not in ("", "localhost"):
        raise RecordProblem(MALFORMED_RECORD, f"file URL {ref[:200]!r} names a host ({parsed.netloc!r}); "
                                              "write file:///absolute/path or a relative path")
    return urllib.parse.unquote(parsed.path)


def canonical_record(obj: Any, record_format: str = "auto") -> Any:
    """`obj` in the canonical layout (see the module docstring), or `obj` itself when it is not
    a mapping (the caller reports that). `RecordProblem` for a record that does not fit
    `record_format` or whose message parts are malformed."""
    if not isinstance(obj, Mapping):
        return obj
    fmt = record_format
    if fmt == "auto":
        fmt = "messages" if "messages" in obj and "conversations" not in obj else "sharegpt"
    key = "messages" if fmt == "messages" else "conversations"
    if key not in obj:
        raise RecordProblem(MALFORMED_RECORD, f"no {key!r} field" + ("" if record_format == "auto" else
                                                                         f" (a {record_format} record)"))
    turns = obj[key]
    if not isinstance(turns, Sequence) or isinstance(turns, (str, bytes)):
        return {"conversations": turns, "images": obj.get("images", obj.get("image"))}
    images = obj.get("images", obj.get("image"))
    if record_format == "auto" and _has_parts(turns):
        fmt = "messages"  # chat turns with content parts, under whichever key
    if fmt == "sharegpt":
        turns = [_sharegpt_turn(t) for t in turns]
        system = obj.get("system")
        if isinstance(system, str) and system and not (turns and _role(turns[0]) == "system"):
            turns = [{"from": "system", "value": system}, *turns]
    elif fmt == "messages":
        turns, images = _message_turns(turns, images)
    return {"conversations": list(turns), "images": images}


def _role(turn: Any) -> Any:
    return turn.get("from", turn.get("role")) if isinstance(turn, Mapping) else None


def _sharegpt_turn(turn: Any) -> Any:
    role = _role(turn)
    if isinstance(role, str) and role.lower() in _SHAREGPT_ASSISTANTS:
        return {**turn, "from": "gpt"}
    return turn


def _has_parts(turns: Sequence[Any]) -> bool:
    return any(isinstance(t, Mapping) and isinstance(t.get("content"), list) for t in turns)


def _message_turns(turns: Sequence[Any], images: Any) -> tuple[list[Any], Any]:
    """Chat messages -> LLaVA turns, and the images in placeholder order when parts name them."""
    if not _has_parts(turns):
        return list(turns), images  # string contents: LLaVA with other key names
    listed = [] if images is None else [images] if isinstance(images, (str, bytes)) else images
    if not isinstance(listed, Sequence):
        raise RecordProblem(MALFORMED_RECORD, f"'images' is a {type(images).__name__}, not a list")
    pending = list(listed)
    ordered: list[Any] = []
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            out.append(turn)  # ValidateConversation names it
            continue
        content = turn.get("content")
        role = turn.get("role", turn.get("from"))
        if isinstance(content, str):
            for _ in range(content.count(IMAGE_PLACEHOLDER)):
                ordered.append(_next_image(pending, i))
            out.append({"from": role, "value": content})
        elif isinstance(content, list):
            out.append({"from": role, "value": _join_parts(content, i, role, pending, ordered)})
        else:
            out.append(turn)
    if pending:
        raise RecordProblem(IMAGE_PLACEHOLDER_MISMATCH, f"{len(pending)} of the record's images are not "
                                                        "referenced by any image part or <image> placeholder")
    return out, ordered


def _next_image(pending: list[Any], turn: int) -> Any:
    if not pending:
        raise RecordProblem(IMAGE_PLACEHOLDER_MISMATCH, f"turn {turn} refers to more images than the record has")
    return pending.pop(0)


def _join_parts(parts: list[Any], turn: int, role: Any, pending: list[Any], ordered: list[Any]) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        where = f"turn {turn} part {j}"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RecordProblem(MALFORMED_RECORD, f"{where}: a text part without a 'text' string")
            texts.append(part["text"])
            continue
        if kind not in ("image", "image_url"):
            raise RecordProblem(MALFORMED_RECORD, f"{where}: not a text/image/image_url part ({str(part)[:100]})")
        if role not in ("user", "human"):
            raise RecordProblem(MALFORMED_RECORD, f"{where}: an image part in a {role!r} turn (images go in user "
                                                  "turns)")
        ref = _inline_image(part, where)
        ordered.append(ref if ref is not None else _next_image(pending, turn))
        texts.append(IMAGE_PLACEHOLDER)
    return "\n".join(texts)


def _inline_image(part: Mapping[str, Any], where: str) -> Any:
    if part["type"] == "image_url":
        url = part.get("image_url")
        if isinstance(url, Mapping):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise RecordProblem(MALFORMED_RECORD, f"{where}: an image_url part without a url string")
        return url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None

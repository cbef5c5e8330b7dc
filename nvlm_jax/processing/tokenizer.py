"""Tokenizer loading (offline, from a checkpoint folder) and a tiny test tokenizer.

NVLM-D-72B ships the Qwen2 byte-level BPE tokenizer as `vocab.json` + `merges.txt` +
`tokenizer_config.json` (no `tokenizer.json`). `load_tokenizer` reads either layout from the
folder itself, never from the Hugging Face hub, and checks that the chat/image special tokens
exist. Their ids always come from the files (`SpecialTokens`), never from constants, so the
same code runs on the 151,665-token release vocabulary and on the ~1,000-token test vocabulary
built by `make_tiny_tokenizer`.

`TextEncoder` wraps a private copy of the tokenizer's Rust backend with special-token matching
switched off: text encoded through it can never produce `<|im_start|>`, `<|im_end|>` or
`<|vision_pad|>`, whatever the text says. The prompt builder (`prompt.py`) encodes all text with
it and inserts the special tokens as ids, which is what makes prompts injection-safe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

# The special tokens of Qwen2 (and so of NVLM-D-72B), in the release's id order.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split pattern (splits letters, single digits, punctuation runs, newlines
# and spaces). The tiny tokenizer uses the same pattern so BPE merges behave like the release:
# e.g. `<Image><tile_1>` merges `><` across the tag boundary in both.
QWEN2_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the chat template and image expansion need.

    Attributes:
      endoftext: `<|endoftext|>` (Qwen2's pad token).
      im_start: `<|im_start|>`, opens a chat turn.
      im_end: `<|im_end|>`, closes a turn; the stop token for generation.
      vision_pad: `<|vision_pad|>`, one per image embedding; replaced by projected features.
    """

    endoftext: int
    im_start: int
    im_end: int
    vision_pad: int


# Field of `SpecialTokens` -> the token's text.
SPECIAL_TOKEN_STRINGS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_pad": "<|vision_pad|>",
}


def _special_id(backend: tokenizers.Tokenizer, token: str, source: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{source}: tokenizer has no special token {token!r}")
    # It must also be matched as one unit in text, i.e. be an added (special) token.
    if backend.encode(token, add_special_tokens=False).ids != [token_id]:
        raise ValueError(
            f"{source}: {token!r} (id {token_id}) is in the vocabulary but is not an added "
            "special token, so text containing it would not map to that id"
        )
    return token_id


def special_tokens_of(backend: tokenizers.Tokenizer, source: str = "tokenizer") -> SpecialTokens:
    """Reads the `SpecialTokens` ids from a `tokenizers.Tokenizer`; ValueError names `source`."""
    return SpecialTokens(
        **{
            name: _special_id(backend, token, source)
            for name, token in SPECIAL_TOKEN_STRINGS.items()
        }
    )


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """Encodes plain text to ids with special tokens disabled, plus the special-token ids.

    Attributes:
      special: ids of the chat and image special tokens.
      backend: a private copy of the tokenizer's `tokenizers.Tokenizer` with
        `encode_special_tokens=True`, so `<|im_end|>` in text becomes ordinary text tokens.
        Added tokens that are not special (Qwen2's `<tool_call>`, `<|fim_prefix|>`, ...) still
        match as units, exactly as when the release tokenizes a whole prompt string.
      vocab_size: `len(tokenizer)` when the encoder was built (used to notice added tokens).
    """

    special: SpecialTokens
    backend: tokenizers.Tokenizer
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; never contains a special token id."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` and, per id, its `(start, end)` character span in `text`.

        A string holding lone surrogates (valid JSON `"\\ud800"`, not Unicode text) is a ValueError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate at character {e.start} (not valid Unicode)") from None
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets


# One encoder per tokenizer object; copying the 151k-token backend takes ~0.4 s, so it is done
# once. Keyed weakly so that dropping a tokenizer frees its encoder too.
_ENCODERS: weakref.WeakKeyDictionary[Any, TextEncoder] = weakref.WeakKeyDictionary()
_ENCODERS_LOCK = threading.Lock()


def _backend_of(tokenizer: Any) -> tokenizers.Tokenizer:
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} has no Rust `backend_tokenizer`; load it with "
            "`load_tokenizer` (a fast Hugging Face tokenizer) or pass a `tokenizers.Tokenizer`"
        )
    return backend


def text_encoder(tokenizer: Any) -> TextEncoder:
    """The `TextEncoder` for a Hugging Face fast tokenizer (or a `tokenizers.Tokenizer`).

    Built on first use and cached per tokenizer object; rebuilt if tokens were added since.
    Raises ValueError if a required special token is missing.
    """
    backend = _backend_of(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    with _ENCODERS_LOCK:
        cached = _ENCODERS.get(tokenizer)
        if cached is not None and cached.vocab_size == size:
            return cached
        plain = tokenizers.Tokenizer.from_str(backend.to_str())
        plain.encode_special_tokens = True
        source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        encoder = TextEncoder(special_tokens_of(backend, source), plain, size)
        _ENCODERS[tokenizer] = encoder
        return encoder


def get_special_tokens(tokenizer: Any) -> SpecialTokens:
    """Special-token ids of a loaded tokenizer (read from its vocabulary, not constants)."""
    return text_encoder(tokenizer).special


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """Loads the Hugging Face tokenizer stored in a checkpoint folder, offline.

    The folder must hold `tokenizer.json` or `vocab.json` + `merges.txt` (the NVLM-D release
    layout), and may hold `tokenizer_config.json` (special tokens, class name). Nothing is
    fetched from the hub (`local_files_only=True`).

    Returns:
      A `transformers` fast tokenizer (for NVLM-D: `Qwen2Tokenizer`). Its `SpecialTokens` are
      checked here and available via `get_special_tokens(tokenizer)`.

    Raises:
      ValueError: naming the folder when files or a required special token are missing, and
      naming the file when one is damaged (not JSON, not a tokenizer).
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path}: tokenizer folder does not exist")
    has_json = (path / TOKENIZER_FILE).is_file()
    has_bpe = (path / VOCAB_FILE).is_file() and (path / MERGES_FILE).is_file()
    if not (has_json or has_bpe):
        raise ValueError(
            f"{path}: no tokenizer files; expected {TOKENIZER_FILE} or {VOCAB_FILE} + {MERGES_FILE}"
        )
    # Imported here: transformers takes ~2 s to import, and tiling/prompt code does not need it.
    import transformers

    config_path = path / TOKENIZER_CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else {}
    # The class comes from tokenizer_config.json alone (not AutoTokenizer), so a checkpoint
    # config.json of a model type transformers does not know (NVLM_D) is never consulted.
    class_name = str(config.get("tokenizer_class") or "")
    cls = getattr(transformers, class_name, None) or getattr(
        transformers, class_name.removesuffix("Fast"), None
    )
    if cls is None:
        if class_name and not has_json:
            raise ValueError(f"{path}: unknown tokenizer_class {class_name!r} in {config_path}")
        cls = transformers.PreTrainedTokenizerFast if has_json else transformers.Qwen2Tokenizer
    if has_json:
        _read_json(path / TOKENIZER_FILE)  # a named error for a damaged file, not the tokenizers library's
    try:
        tokenizer = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
        raise ValueError(f"{path}: cannot load tokenizer: {type(e).__name__}: {str(e)[:200]}") from e
    backend = _backend_of(tokenizer)
    special_tokens_of(backend, str(path))
    return tokenizer


TINY_SPEC = "tiny"


def tokenizer_from_spec(spec: str | os.PathLike[str]) -> Any:
    """The tokenizer a spec names, as training run configs and checkpoints store it: "tiny" is
    the built-in tiny tokenizer (`build_tiny_backend`), anything else a tokenizer folder
    (`load_tokenizer`)."""
    if os.fspath(spec) == TINY_SPEC:
        return build_tiny_backend()
    return load_tokenizer(spec)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = f"{e.msg} at offset {e.pos}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise ValueError(f"{path}: cannot read JSON ({detail})") from e


# ------------------------------------------------------------------------------------------
# Tiny tokenizer for tests and the no-download path.

_COLOURS = "red green blue yellow orange purple pink brown black white grey gray cyan".split()
_SHAPES = "circle square triangle rectangle star line dot oval cross arrow".split()
_PLACES = ["top left", "top right", "bottom left", "bottom right", "centre", "center", "middle"]
_WORDS = (
    "the a an and or of in on at to is are was were be been it its this that these those "
    "there here what which who where when why how many much count number image picture photo "
    "tile tiles thumbnail global describe shortly please answer question questions user "
    "assistant system follow instruction instructions text word words letter letters page "
    "document chart table row column left right top bottom above below next to between with "
    "without shape shapes colour color colors size big small large tiny one two three four five "
    "six seven eight nine ten yes no true false I you we they he she see show shows contains "
    "contain has have do does can could would should will not only also more less than first "
    "last second third read write say said find found give gives box boxes region object "
    "objects background foreground hello hi thanks good bad"
).split()
_SENTENCE_TEMPLATES = (
    "There is a {c} {s} in the {p} of the image.",
    "What colour is the {s}? The {s} is {c}.",
    "How many {s}s are there? There are {n} {c} {s}s.",
    "Describe the image shortly. A {c} {s} on a {c2} background.",
    "Is the {s} {c}? Yes, it is {c}.",
    "The {c} {s} is at the {p}, next to a {c2} {s2}.",
)


def _tiny_corpus() -> list[str]:
    """A fixed, order-stable training corpus for the tiny tokenizer."""
    lines = [
        "system\nAnswer the questions.",
        "system\nFollow the user's instruction and answer questions.",
        "user\n<image>\nPlease describe the image shortly.",
        "assistant\nThe image shows a red circle.",
        "<Image><tile_global_thumbnail></Image>",
        "<tile_global>",
        " ".join(_WORDS),
        " ".join(w.capitalize() for w in _WORDS),
        " ".join(str(i) for i in range(1000)),
        "0123456789 , . ; : ! ? ' \" ( ) [ ] { } < > / \\ - _ + = * & % $ # @ ~ | ^",
    ]
    # Tile tags of every tag style, repeated so that their pieces become merges.
    for k in range(1, 13):
        lines.append(f"<Image><tile_{k}></Image> <tile_{k}> user\n<Image><tile_{k}>")
    for c in range(1, 7):
        for r in range(1, 7):
            lines.append(f"<tile_x{c}_y{r}>")
    for x0, x1 in ((0, 500), (500, 1000), (0, 333), (333, 666), (666, 1000), (0, 1000)):
        lines.append(f"<box>({x0},0),({x1},1000)</box>")
    for i, (c, s) in enumerate((c, s) for c in _COLOURS for s in _SHAPES):
        template = _SENTENCE_TEMPLATES[i % len(_SENTENCE_TEMPLATES)]
        lines.append(
            template.format(
                c=c,
                s=s,
                p=_PLACES[i % len(_PLACES)],
                n=i % 10,
                c2=_COLOURS[(i + 3) % len(_COLOURS)],
                s2=_SHAPES[(i + 5) % len(_SHAPES)],
            )
        )
    return lines * 3


def build_tiny_backend(vocab_size: int = 1000) -> tokenizers.Tokenizer:
    """Trains the tiny Qwen2-style byte-level BPE tokenizer (deterministic, ~0.1 s).

    Args:
      vocab_size: upper bound on the total vocabulary, special tokens included.

    Returns:
      A `tokenizers.Tokenizer` with Qwen2's normalizer (NFC), pre-tokenizer (the Qwen2 split
      regex, then byte-level) and the eight Qwen2 special tokens appended after the BPE
      vocabulary (as in the release, where they follow the 151,643 BPE tokens).
    """
    if vocab_size < 256 + len(QWEN2_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256-byte alphabet + specials")
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN2_SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS]
    )
    return tok


def _tiny_tokenizer_config(backend: tokenizers.Tokenizer) -> dict[str, Any]:
    added = {
        str(backend.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in QWEN2_SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def make_tiny_tokenizer(out_dir: str | os.PathLike[str], *, vocab_size: int = 1000) -> Path:
    """Writes a tiny Qwen2-style tokenizer (`tokenizer.json` + `tokenizer_config.json`).

    Same special tokens, normalizer and pre-tokenizer as Qwen2, BPE trained on a small built-in
    corpus (English words, digits, tile tags, colours/shapes, chat roles). The files are
    byte-identical on every run. Load them with `load_tokenizer(out_dir)`.

    Args:
      out_dir: folder to write into (created if missing).
      vocab_size: upper bound on the vocabulary size, special tokens included.

    Returns:
      `out_dir` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = build_tiny_backend(vocab_size)
    (out / TOKENIZER_FILE).write_text(backend.to_str(pretty=True) + "\n", encoding="utf-8")
    config = _tiny_tokenizer_config(backend)
    (out / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return out


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decodes ids to text, special tokens included (for debugging and tests)."""
    return _backend_of(tokenizer).decode(list(ids), skip_special_tokens=False)

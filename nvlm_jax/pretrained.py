"""`load_pretrained`: a Hugging Face NVLM-D folder or one of our Orbax folders → a ready model.

    model = nvlm_jax.load_pretrained("NVLM-D-72B/", dtype="bfloat16", mesh=make_mesh(tensor=8))
    model.chat("photo.jpg", "Describe the image.")

`NVLMModel` bundles the config, params (a plain dict of jax.Arrays, sharded when a mesh is
given), the tokenizer (from the folder's own files) and jit-compiled entry points: `forward`
(logits), `generate` (KV-cached decoding, see `nvlm_jax.generate`) and `chat` (the release's
conversation flow: tiling, prompt template, `<image>` expansion, decoding of the answer).
All three work for NVLM-D, -X and -H; `prepare_chat` builds one prompt's model inputs (ids,
tiles, and for X/H the cross-attention ids), which `forward` and `generate` also accept:

    inputs = model.prepare_chat("photo.jpg", "Describe the image.")
    logits = model.forward(inputs)                      # [1, seq, vocab]
    tokens = model.generate([inputs, other_inputs])     # a batch of prompts
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nvlm_jax import convert
from nvlm_jax.config import NVLMConfig
from nvlm_jax.generate import GenerateOutput, PromptBatch, SamplingParams, generate, mesh_context, prepare_row_tiles
from nvlm_jax.models.nvlm import NVLM, check_image_token_count, check_mesh
from nvlm_jax.processing import EncodedPrompt, encode_prompt, get_special_tokens, load_tokenizer, tiling
from nvlm_jax.processing.prompt import (
    DEFAULT_SYSTEM_MESSAGE,
    IMAGE_PLACEHOLDER,
    CrossAttentionIds,
    cross_attention_ids,
)
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, input_ids, pixel_values, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, input_ids, pixel_values)[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward_rows(params, input_ids, pixels, tile_valid, tile_image, token_image, token_tile, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, input_ids, pixels, tile_valid, tile_image=tile_image,
                           token_image=token_image, token_tile=token_tile)[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_images(params, pixel_values, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, pixel_values, method=NVLM.encode_images)


@dataclasses.dataclass(frozen=True, eq=False)
class ChatInputs:
    """One chat prompt ready for the model (from `NVLMModel.prepare_chat`).

    Attributes:
      question: the question as rendered (with the `<image>` placeholders that were prepended).
      prompt: the encoded prompt (`input_ids [seq]`, `tile_ids`, `num_tiles`, `text`).
      pixel_values: `[tiles, H, W, 3]` f32, the tiles of all images in order, or None.
      cross_ids: NVLM-X/H: `token_image`, `token_tile` `[seq]` and `tile_image` `[tiles]`; None for D.
    """

    question: Any
    prompt: EncodedPrompt
    pixel_values: np.ndarray | None
    cross_ids: CrossAttentionIds | None

    @property
    def input_ids(self) -> np.ndarray:
        return self.prompt.input_ids


def _unpack_chat_inputs(rows: Sequence[ChatInputs]) -> dict[str, Any]:
    """Per-row generate/forward arguments of several `ChatInputs` (X/H fields None for D)."""
    cross = [r.cross_ids for r in rows]
    if any(c is None for c in cross):
        cross = None
    return dict(
        input_ids=[r.input_ids for r in rows],
        pixel_values=[r.pixel_values for r in rows],
        token_image=None if cross is None else [c.token_image for c in cross],
        token_tile=None if cross is None else [c.token_tile for c in cross],
        tile_image=None if cross is None else [c.tile_image for c in cross],
    )


class NVLMModel:
    """A loaded NVLM model.

    Attributes:
      config: the `NVLMConfig` (its `dtype`/`param_dtype` are the loaded dtype).
      params: nested dict of jax.Arrays (on `mesh` when given).
      tokenizer: the Hugging Face tokenizer of the checkpoint folder, or None if it has none.
      mesh: the device mesh the params live on, or None (first device).
    """

    def __init__(
        self,
        config: NVLMConfig,
        params: dict,
        tokenizer: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: LogicalRules = DEFAULT_RULES,
    ):
        self.config, self.params, self.tokenizer, self.mesh, self.rules = config, params, tokenizer, mesh, rules

    def __repr__(self) -> str:
        c = self.config
        return (f"NVLMModel(arch={c.arch}, vision={c.vision.num_layers}x{c.vision.hidden_size}, "
                f"llm={c.llm.num_layers}x{c.llm.hidden_size}, dtype={c.param_dtype}, mesh={self.mesh})")

    # ---- special tokens ----

    def _special(self):
        if self.tokenizer is None:
            return None
        return get_special_tokens(self.tokenizer)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model was loaded from a folder without tokenizer files; chat needs one")
        return self._special()

    # ---- model calls ----

    def forward(
        self,
        input_ids,
        pixel_values=None,
        *,
        tile_valid=None,
        tile_image=None,
        token_image=None,
        token_tile=None,
    ) -> jax.Array:
        """Logits `[batch, seq, vocab]` (f32).

        input_ids: int `[batch, seq]` already holding the image context tokens, or one
        `ChatInputs` (from `prepare_chat`; then nothing else is passed and batch = 1).
        NVLM-D: pixel_values float `[num_tiles, H, W, 3]`, the tiles of all images in order.
        NVLM-X/H: the per-row inputs of the batch contract: pixel_values `[batch, tiles, H, W, 3]`
        (or a list of `[tiles_i, H, W, 3]` / None per row), tile_valid `[batch, tiles]` (default
        all valid), tile_image `[batch, tiles]`, token_image / token_tile `[batch, seq]`; tile
        slots are padded to a power of two. Image token counts are checked on the host
        (ValueError on mismatch).
        """
        c = self.config
        if isinstance(input_ids, ChatInputs):
            if pixel_values is not None or any(x is not None for x in (tile_valid, tile_image, token_image,
                                                                        token_tile)):
                raise ValueError("forward(ChatInputs) takes its images and ids from the ChatInputs: pass nothing else")
            args = _unpack_chat_inputs([input_ids])
            input_ids, pixel_values = args.pop("input_ids")[0][None], args.pop("pixel_values")
            if c.arch == "D":
                pixel_values = pixel_values[0]
            else:
                token_image, token_tile = args["token_image"][0][None], args["token_tile"][0][None]
                tile_image = args["tile_image"]
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        if c.arch in ("X", "H"):
            b, s = ids.shape
            full = PromptBatch(ids, np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)), np.ones((b, s), np.int32),
                               np.full((b,), s, np.int32))
            rows = prepare_row_tiles(c, full, pixel_values, token_image, token_tile, tile_image, tile_valid)
            with mesh_context(self.mesh, self.rules):
                return _forward_rows(self.params, ids, rows.pixels, rows.tile_valid, rows.tile_image,
                                     rows.token_image, rows.token_tile, cfg=c)
        pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        check_image_token_count(c, ids, 0 if pixels is None else pixels.shape[0])
        with mesh_context(self.mesh, self.rules):
            return _forward(self.params, ids, pixels, cfg=c)

    def encode_images(self, pixel_values) -> jax.Array:
        """Projected image tokens `[tiles, tokens_per_tile, llm_hidden]` of `[tiles, H, W, 3]` tiles."""
        with mesh_context(self.mesh, self.rules):
            return _encode_images(self.params, np.asarray(pixel_values, np.float32), cfg=self.config)

    def generate(
        self,
        input_ids,
        pixel_values=None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] | None = None,
        attention_mask=None,
        pad_token_id: int | None = None,
        return_logits: bool = False,
        token_image=None,
        token_tile=None,
        tile_image=None,
        tile_valid=None,
    ) -> np.ndarray | GenerateOutput:
        """New tokens `[batch, steps]` (int32) for each prompt, `steps ≤ max_new_tokens`.

        input_ids: `[batch, seq]` (+ optional `attention_mask`) or a list of prompts of different
        lengths, or a `ChatInputs` / list of `ChatInputs` (from `prepare_chat`; they carry their
        images and ids). pixel_values and the X/H ids: see `nvlm_jax.generate.generate` (D: all
        tiles in order; X/H: per prompt). Stops at the tokenizer's `<|im_end|>` unless
        `stop_token_ids` says otherwise (`()` never stops early). Rows that stopped are padded
        with `pad_token_id` (default: the tokenizer's `<|endoftext|>`, else 0). With
        `return_logits`, returns a `GenerateOutput`.
        """
        if isinstance(input_ids, ChatInputs):
            input_ids = [input_ids]
        if isinstance(input_ids, list | tuple) and input_ids and all(isinstance(r, ChatInputs) for r in input_ids):
            if pixel_values is not None or any(x is not None for x in (token_image, token_tile, tile_image,
                                                                        tile_valid, attention_mask)):
                raise ValueError("generate(ChatInputs) takes its images and ids from the ChatInputs: pass nothing "
                                 "else")
            args = _unpack_chat_inputs(input_ids)
            input_ids, pixel_values = args["input_ids"], args["pixel_values"]
            token_image, token_tile, tile_image = args["token_image"], args["token_tile"], args["tile_image"]
        special = self._special()
        if stop_token_ids is None:
            stop_token_ids = () if special is None else (special.im_end,)
        if pad_token_id is None:
            pad_token_id = 0 if special is None else special.endoftext
        out = generate(
            self.params, self.config, input_ids, pixel_values, attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(do_sample, temperature, top_k, top_p), seed=seed,
            stop_token_ids=tuple(stop_token_ids), pad_token_id=pad_token_id, mesh=self.mesh, rules=self.rules,
            return_logits=return_logits, token_image=token_image, token_tile=token_tile, tile_image=tile_image,
            tile_valid=tile_valid,
        )
        return out if return_logits else out.tokens

    # ---- chat ----

    def _tile(self, image) -> np.ndarray:
        if isinstance(image, np.ndarray) and image.ndim == 4:
            return image.astype(np.float32)  # already tiled: [tiles, H, W, 3]
        if isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(np.asarray(image, np.uint8))
        c = self.config
        return tiling.tile_image(image, c.max_tiles, tile_size=c.vision.image_size,
                                 use_thumbnail=c.use_thumbnail).pixels

    def prepare_images(self, images) -> tuple[np.ndarray | None, list[int]]:
        """Tiles of every image, concatenated `[tiles, H, W, 3]`, and the tile count per image.

        images: None, one image or a list of images; an image is a path, bytes, a PIL image, an
        `[H, W, 3]` uint8 array, or already-tiled float pixels `[tiles, H, W, 3]`.
        """
        if images is None:
            return None, []
        if not isinstance(images, list | tuple):
            images = [images]
        tiles = [self._tile(im) for im in images]
        if not tiles:
            return None, []
        return np.concatenate(tiles, axis=0), [t.shape[0] for t in tiles]

    def prepare_chat(
        self,
        images,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        *,
        system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
    ) -> ChatInputs:
        """The model inputs of one chat turn, for this model's arch.

        Tiles the images, renders the release's prompt (NVLM-D: tags + image tokens for every
        tile; X: tags only; H: tags, image tokens for the thumbnails) and, for X/H, computes the
        cross-attention ids (`cross_attention_ids`). Without history, a question that has no
        `<image>` gets one `<image>\\n` per image in front of it. Arguments as `chat`.
        """
        self._require_tokenizer()
        pixels, num_tiles = self.prepare_images(images)
        if history is None and num_tiles and isinstance(question, str) and IMAGE_PLACEHOLDER not in question:
            question = (IMAGE_PLACEHOLDER + "\n") * len(num_tiles) + question
        c = self.config
        prompt = encode_prompt(
            self.tokenizer, question, num_tiles, history, system_message=system_message, arch=c.arch,
            tokens_per_tile=c.num_image_tokens, use_thumbnail=c.use_thumbnail,
        )
        cross = cross_attention_ids(prompt) if c.arch in ("X", "H") else None
        return ChatInputs(question, prompt, pixels, cross)

    def chat(
        self,
        images,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        *,
        return_history: bool = False,
        system_message: str | None = DEFAULT_SYSTEM_MESSAGE,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """Answers `question` about `images`, like the release's `model.chat` (any arch).

        Without history, a question that has no `<image>` gets one `<image>\\n` per image in
        front of it. `history` holds earlier `(question, answer)` turns (as returned with
        `return_history=True`); their `<image>` placeholders refer to `images` too, so pass the
        same images again. Returns the answer (decoded without special tokens, cut at
        `<|im_end|>`, stripped), and the updated history when `return_history`.
        """
        special = self._require_tokenizer()
        inputs = self.prepare_chat(images, question, history, system_message=system_message)
        question = inputs.question
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=(special.im_end,),
                       pad_token_id=special.endoftext)
        if inputs.cross_ids is None:  # D: the tiles of all images in order
            pixels = inputs.pixel_values
        else:  # X/H: the row's tiles and its cross-attention ids
            pixels = [inputs.pixel_values]
            ids = inputs.cross_ids
            options.update(token_image=[ids.token_image], token_tile=[ids.token_tile], tile_image=[ids.tile_image])
        tokens = self.generate(inputs.input_ids[None], pixels, max_new_tokens, do_sample, **options)[0]
        stop = np.flatnonzero(tokens == special.im_end)
        if stop.size:
            tokens = tokens[: stop[0]]
        answer = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()
        if return_history:
            return answer, list(history or []) + [(question, answer)]
        return answer


def read_config(path: str | os.PathLike) -> NVLMConfig:
    """The config of a checkpoint folder (ours or a Hugging Face one) without reading weights.

    For a Hugging Face folder this is `NVLMConfig.from_hf` (the release's 7 dummy ViT heads
    assumed); `load_pretrained` refines it from the tensors and the tokenizer.
    """
    folder = Path(path)
    if convert.is_our_checkpoint(folder):
        return convert.read_our_config(folder)
    return NVLMConfig.from_hf(folder / convert.HF_CONFIG_FILE)


def choose_mesh(cfg: NVLMConfig, num_devices: int, rules: LogicalRules = DEFAULT_RULES) -> jax.sharding.Mesh:
    """An inference mesh over `num_devices`: as many on the tensor axis as `cfg`'s head counts
    allow (decoding then never gathers whole weights), the rest on fsdp."""
    for tensor in sorted((d for d in range(1, num_devices + 1) if num_devices % d == 0), reverse=True):
        mesh = make_mesh(data=1, fsdp=-1, tensor=tensor, devices=jax.devices()[:num_devices])
        try:
            check_mesh(cfg, mesh, rules)
        except ValueError:
            continue
        return mesh
    raise ValueError(f"no (fsdp, tensor) mesh over {num_devices} devices fits this model")


def load_pretrained(
    path: str | os.PathLike,
    dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    *,
    rules: LogicalRules = DEFAULT_RULES,
    drop_dummy_heads: bool = False,
    progress: bool = False,
) -> NVLMModel:
    """Loads an NVLM model from a Hugging Face folder or one of our Orbax checkpoint folders.

    Args:
      path: an NVLM-D release-layout folder (`config.json` + safetensors [+ index] + tokenizer
        files; converted on the fly, one param at a time) or a folder written by
        `nvlm_jax.convert` (`nvlm_config.json` + `params/`).
      dtype: params are stored and computed in this dtype ("bfloat16", or "float32" for parity).
      mesh: place the params sharded over this mesh by the logical-axis `rules`; None = first device.
      drop_dummy_heads: HF folders only: slice the verified-zero dummy ViT heads away.
      progress: HF folders only: draw a progress bar.
    """
    folder = Path(path)
    if convert.is_our_checkpoint(folder):
        cfg = convert._with_dtype(convert.read_our_config(folder), dtype)
        params = convert.load_our_params(folder, cfg, mesh, rules)
    elif (folder / convert.HF_CONFIG_FILE).is_file():
        cfg, params = convert.load_hf_params(folder, dtype, mesh, drop_dummy_heads=drop_dummy_heads,
                                             progress=progress, rules=rules)
    else:
        raise ValueError(
            f"{folder}: neither an nvlm_jax checkpoint ({convert.OUR_CONFIG_FILE} + {convert.PARAMS_DIR}/) "
            f"nor a Hugging Face folder ({convert.HF_CONFIG_FILE})"
        )
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        tokenizer = load_tokenizer(folder)
    return NVLMModel(cfg, params, tokenizer, mesh, rules)

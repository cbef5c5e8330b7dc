"""`load_pretrained`: a Hugging Face NVLM-D folder or one of our Orbax folders → a ready model.

    model = nvlm_jax.load_pretrained("NVLM-D-72B/", dtype="bfloat16", mesh=make_mesh(tensor=8))
    model.chat("photo.jpg", "Describe the image.")

`NVLMModel` bundles the config, params (a plain dict of jax.Arrays, sharded when a mesh is
given), the tokenizer (from the folder's own files) and jit-compiled entry points: `forward`
(logits), `generate` (KV-cached decoding, see `nvlm_jax.generate`) and `chat` (the release's
conversation flow: tiling, prompt template, `<image>` expansion, decoding of the answer).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nvlm_jax import convert
from nvlm_jax.config import NVLMConfig
from nvlm_jax.generate import GenerateOutput, SamplingParams, generate, mesh_context
from nvlm_jax.models.nvlm import NVLM, check_image_token_count, check_mesh
from nvlm_jax.processing import encode_prompt, get_special_tokens, load_tokenizer, tile_image
from nvlm_jax.processing.prompt import DEFAULT_SYSTEM_MESSAGE, IMAGE_PLACEHOLDER
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(params, input_ids, pixel_values, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, input_ids, pixel_values)[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _encode_images(params, pixel_values, *, cfg: NVLMConfig):
    return NVLM(cfg).apply({"params": params}, pixel_values, method=NVLM.encode_images)


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

    def forward(self, input_ids, pixel_values=None) -> jax.Array:
        """Logits `[batch, seq, vocab]` (f32).

        input_ids: int `[batch, seq]` already holding the image context tokens; pixel_values:
        float `[num_tiles, H, W, 3]`, the tiles of all images in order. The number of context
        tokens is checked against the tiles on the host (ValueError on mismatch).
        """
        if self.config.arch != "D":
            raise ValueError(
                f"forward(input_ids, pixel_values) is the NVLM-D interface; NVLM-{self.config.arch} needs the "
                "batch contract of nvlm_jax.data (use nvlm_jax.models.nvlm.apply_batch)"
            )
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        check_image_token_count(self.config, ids, 0 if pixels is None else pixels.shape[0])
        with mesh_context(self.mesh, self.rules):
            return _forward(self.params, ids, pixels, cfg=self.config)

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
    ) -> np.ndarray | GenerateOutput:
        """New tokens `[batch, steps]` (int32) for each prompt, `steps ≤ max_new_tokens`.

        input_ids: `[batch, seq]` (+ optional `attention_mask`) or a list of prompts of different
        lengths. Stops at the tokenizer's `<|im_end|>` unless `stop_token_ids` says otherwise
        (`()` never stops early). Rows that stopped are padded with `pad_token_id` (default: the
        tokenizer's `<|endoftext|>`, else 0). With `return_logits`, returns a `GenerateOutput`.
        """
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
            return_logits=return_logits,
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
        return tile_image(image, c.max_tiles, tile_size=c.vision.image_size, use_thumbnail=c.use_thumbnail).pixels

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
        """Answers `question` about `images`, like the release's `model.chat`.

        Without history, a question that has no `<image>` gets one `<image>\\n` per image in
        front of it. `history` holds earlier `(question, answer)` turns (as returned with
        `return_history=True`); their `<image>` placeholders refer to `images` too, so pass the
        same images again. Returns the answer (decoded without special tokens, cut at
        `<|im_end|>`, stripped), and the updated history when `return_history`.
        """
        special = self._require_tokenizer()
        pixels, num_tiles = self.prepare_images(images)
        if history is None and num_tiles and isinstance(question, str) and IMAGE_PLACEHOLDER not in question:
            question = (IMAGE_PLACEHOLDER + "\n") * len(num_tiles) + question
        c = self.config
        prompt = encode_prompt(
            self.tokenizer, question, num_tiles, history, system_message=system_message, arch=c.arch,
            tokens_per_tile=c.num_image_tokens, use_thumbnail=c.use_thumbnail,
        )
        tokens = self.generate(
            prompt.input_ids[None], pixels, max_new_tokens, do_sample, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_token_ids=(special.im_end,), pad_token_id=special.endoftext,
        )[0]
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

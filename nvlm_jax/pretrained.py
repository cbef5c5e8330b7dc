"""`load_pretrained`: any checkpoint → a ready model. A Hugging Face NVLM-D folder, a converted
folder, a training workdir (its latest step; or `step="best"` / a number) or one
`checkpoints/<step>` folder: `nvlm_jax.checkpoint.folders.locate` decides which.

    model = nvlm_jax.load_pretrained("NVLM-D-72B/", dtype="bfloat16", mesh=make_mesh(tensor=8))
    model.chat("photo.jpg", "Describe the image.")
    model = nvlm_jax.load_pretrained("runs/tiny")       # the run's latest checkpoint

`NVLMModel` bundles the config, params (a plain dict of jax.Arrays, sharded when a mesh is
given), the tokenizer (the folder's own files, or a training run's tokenizer), the prompt format
it was trained with (`prompt_format`: tile tags, tile budget, thumbnail, system message; the
release's for a Hugging Face folder) and jit-compiled entry points: `forward`
(logits), `generate` (KV-cached decoding, see `nvlm_jax.generate`) and `chat` (the release's
conversation flow: tiling, prompt template, `<image>` expansion, decoding of the answer).
All three work for NVLM-D, -X and -H; `prepare_chat` builds one prompt's model inputs (ids,
tiles, and for X/H the cross-attention ids), which `forward` and `generate` also accept:

    inputs = model.prepare_chat("photo.jpg", "Describe the image.")
    logits = model.forward(inputs)                      # [1, seq, vocab]
    tokens = model.generate([inputs, other_inputs])     # a batch of prompts
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from nvlm_jax.checkpoint import folders
from nvlm_jax.checkpoint import restore as restore_lib
from nvlm_jax.checkpoint.hf_import import load_hf_params
from nvlm_jax.checkpoint.manifest import verify_manifest
from nvlm_jax.checkpoint.quantized import quantize_params
from nvlm_jax.config import NVLMConfig
from nvlm_jax.generate import (
    GenerateOutput,
    PromptBatch,
    SamplingParams,
    cut_at_stop,
    generate,
    mesh_context,
    prepare_row_tiles,
)
from nvlm_jax.models import layer_layout as layout_lib
from nvlm_jax.models import lora as lora_lib
from nvlm_jax.models.nvlm import NVLM, check_image_token_count, check_mesh
from nvlm_jax.models.quantize import check_mode
from nvlm_jax.processing import EncodedPrompt, encode_prompt, get_special_tokens, tiling
from nvlm_jax.processing.prompt import IMAGE_PLACEHOLDER, CrossAttentionIds, cross_attention_ids
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.processing.tokenizer import tokenizer_from_spec
from nvlm_jax.sharding import DEFAULT_RULES, LogicalRules, make_mesh


class _FromFormat:
    """The default `system_message` of `NVLMModel`'s chat methods: the prompt format's."""

    def __repr__(self) -> str:
        return "<the prompt format's>"


FROM_FORMAT: Any = _FromFormat()


def _intercepting(intercept):
    """`nn.intercept_methods(intercept)`, or nothing for None."""
    return contextlib.nullcontext() if intercept is None else nn.intercept_methods(intercept)


@functools.partial(jax.jit, static_argnames=("cfg", "intercept"))
def _forward(params, input_ids, pixel_values, *, cfg: NVLMConfig, intercept=None):
    with _intercepting(intercept):
        return NVLM(cfg).apply({"params": params}, input_ids, pixel_values)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "intercept"))
def _forward_rows(params, input_ids, pixels, tile_valid, tile_image, token_image, token_tile, *, cfg: NVLMConfig,
                  intercept=None):
    with _intercepting(intercept):
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
      tokenizer: the checkpoint's tokenizer, or None if it has none.
      mesh: the device mesh the params live on, or None (first device).
      prompt_format: how prompts are written for this model (`PromptFormat`; default: the
        model's, `PromptFormat.for_model(config)`); `prepare_chat` / `chat` follow it.
      source: where it was loaded from (`folders.Located`), or None.
    """

    def __init__(
        self,
        config: NVLMConfig,
        params: dict,
        tokenizer: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: LogicalRules = DEFAULT_RULES,
        prompt_format: PromptFormat | None = None,
        source: folders.Located | None = None,
    ):
        self.config, self.params, self.tokenizer, self.mesh, self.rules = config, params, tokenizer, mesh, rules
        self.prompt_format = prompt_format or PromptFormat.for_model(config)
        self.source = source

    def __repr__(self) -> str:
        c = self.config
        return (f"NVLMModel(arch={c.arch}, vision={c.vision.num_layers}x{c.vision.hidden_size}, "
                f"llm={c.llm.num_layers}x{c.llm.hidden_size}, dtype={c.param_dtype}, quantize={c.quantize}, "
                f"mesh={self.mesh})")

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
        intercept=None,
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
        intercept: a flax method interceptor (`nn.intercept_methods`) active while the forward is
        traced, e.g. to record layer inputs with `jax.debug.callback` (GPTQ calibration,
        `nvlm_jax.checkpoint.gptq`); each interceptor object compiles its own program.
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
                                     rows.token_image, rows.token_tile, cfg=c, intercept=intercept)
        pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        check_image_token_count(c, ids, 0 if pixels is None else pixels.shape[0])
        with mesh_context(self.mesh, self.rules):
            return _forward(self.params, ids, pixels, cfg=c, intercept=intercept)

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

    def _tile(self, image) -> tuple[np.ndarray, tuple[int, int] | None]:
        """`([tiles, H, W, 3] pixels, (cols, rows) grid or None)` of one image, by the prompt
        format's tile budget and thumbnail rule."""
        if isinstance(image, np.ndarray) and image.ndim == 4:
            return image.astype(np.float32), None  # already tiled: [tiles, H, W, 3]
        if isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(np.asarray(image, np.uint8))
        fmt = self.prompt_format
        tiled = tiling.tile_image(image, fmt.max_tiles, tile_size=self.config.vision.image_size,
                                  use_thumbnail=fmt.use_thumbnail)
        return tiled.pixels, tuple(tiled.grid)

    def tile_images(self, images) -> tuple[np.ndarray | None, list[int], list[tuple[int, int] | None]]:
        """`prepare_images` plus each image's `(cols, rows)` grid (None for pre-tiled pixels)."""
        if images is None:
            return None, [], []
        if not isinstance(images, list | tuple):
            images = [images]
        tiled = [self._tile(im) for im in images]
        if not tiled:
            return None, [], []
        return np.concatenate([t for t, _ in tiled], axis=0), [t.shape[0] for t, _ in tiled], [g for _, g in tiled]

    def prepare_images(self, images) -> tuple[np.ndarray | None, list[int]]:
        """Tiles of every image, concatenated `[tiles, H, W, 3]`, and the tile count per image.

        images: None, one image or a list of images; an image is a path, bytes, a PIL image, an
        `[H, W, 3]` uint8 array, or already-tiled float pixels `[tiles, H, W, 3]`. Tiled by the
        prompt format's tile budget (`max_tiles`) and thumbnail rule.
        """
        pixels, num_tiles, _ = self.tile_images(images)
        return pixels, num_tiles

    def encode(self, question, num_tiles: Sequence[int] = (), history=None, *,
               grids: Sequence[tuple[int, int] | None] | None = None,
               system_message: Any = FROM_FORMAT) -> EncodedPrompt:
        """The prompt ids of one chat turn in this model's prompt format (tags, tokens per tile,
        thumbnail rule, system message; an explicit `system_message`, None included, wins).
        `grids`: the `(cols, rows)` of each image, needed by the 2-D tag styles."""
        fmt = self.prompt_format
        system = fmt.system_message if system_message is FROM_FORMAT else system_message
        if grids is not None and any(g is None for g in grids):
            grids = None
        return encode_prompt(
            self.tokenizer, question, list(num_tiles), history, system_message=system, arch=self.config.arch,
            tag_style=fmt.tag_style, grids=grids, tokens_per_tile=fmt.tokens_per_tile,
            use_thumbnail=fmt.use_thumbnail,
        )

    def prepare_chat(
        self,
        images,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        *,
        system_message: Any = FROM_FORMAT,
    ) -> ChatInputs:
        """The model inputs of one chat turn, for this model's arch and prompt format.

        Tiles the images (the format's tile budget and thumbnail rule), renders the prompt
        (NVLM-D: tags + image tokens for every tile; X: tags only; H: tags, image tokens for the
        thumbnails; tags in the format's style) and, for X/H, computes the cross-attention ids
        (`cross_attention_ids`). Without history, a question that has no `<image>` gets one
        `<image>\\n` per image in front of it. `system_message`: default the format's; an
        explicit value (None: no system turn) wins. Arguments as `chat`.
        """
        self._require_tokenizer()
        pixels, num_tiles, grids = self.tile_images(images)
        if history is None and num_tiles and isinstance(question, str) and IMAGE_PLACEHOLDER not in question:
            question = (IMAGE_PLACEHOLDER + "\n") * len(num_tiles) + question
        c = self.config
        prompt = self.encode(question, num_tiles, history, grids=grids, system_message=system_message)
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
        system_message: Any = FROM_FORMAT,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """Answers `question` about `images`, like the release's `model.chat` (any arch).

        Without history, a question that has no `<image>` gets one `<image>\\n` per image in
        front of it. `history` holds earlier `(question, answer)` turns (as returned with
        `return_history=True`); their `<image>` placeholders refer to `images` too, so pass the
        same images again. The prompt follows `prompt_format` (its system message unless
        `system_message` is given; None: no system turn). Returns the answer (decoded without special tokens, cut at
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
        tokens, _ = cut_at_stop(tokens, (special.im_end,))
        answer = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()
        if return_history:
            return answer, list(history or []) + [(question, answer)]
        return answer

    def stream_chat(
        self,
        images,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        *,
        system_message: Any = FROM_FORMAT,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        engine: Any = None,
    ) -> Iterator[str]:
        """`chat`'s answer as it is produced: yields text pieces whose concatenation is the
        answer (before `chat`'s final strip), ending at `<|im_end|>`, at the first of the `stop`
        strings (not included) or after `max_new_tokens`. Arguments as `chat`.

        Runs on `engine` (a started `nvlm_jax.serve.engine.Engine` of this model, e.g. a
        server's, sharing its slots) or else on the model's own (continuous batching over the
        same decoder as `generate`; created on first use with one slot and kept), so several
        threads may stream at once. Leaving the loop early frees the request's slot.
        """
        from nvlm_jax.serve.image_cache import content_key
        from nvlm_jax.serve.protocol import Delta, EngineRequest, Failed, ImageInput, RequestSampling

        special = self._require_tokenizer()
        inputs = self.prepare_chat(images, question, history, system_message=system_message)
        pixels, images_in = inputs.pixel_values, []
        for count in inputs.prompt.num_tiles:
            tiles, pixels = pixels[:count], pixels[count:]
            images_in.append(ImageInput(content_key(np.ascontiguousarray(tiles).tobytes()), tiles))
        cross = inputs.cross_ids
        request = EngineRequest(
            input_ids=inputs.input_ids, images=tuple(images_in),
            token_image=None if cross is None else cross.token_image,
            token_tile=None if cross is None else cross.token_tile,
            tile_image=None if cross is None else cross.tile_image, max_tokens=max_new_tokens,
            sampling=RequestSampling(temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                                     seed=seed),
            stop=tuple(stop), stop_token_ids=(special.im_end,))
        engine = engine or self._stream_engine(inputs.input_ids.size + max_new_tokens)
        handle = engine.submit(request)
        try:
            for event in handle:
                if isinstance(event, Delta):
                    yield event.text
                elif isinstance(event, Failed):
                    raise ValueError(event.message)
        finally:
            handle.cancel()

    def _stream_engine(self, length: int):
        """The engine of `stream_chat`, rebuilt larger when a request needs more context."""
        from nvlm_jax.serve.engine import Engine

        limit = self.config.llm.max_position_embeddings
        if length > limit:
            raise ValueError(f"prompt + max_new_tokens ({length} tokens) exceeds max_position_embeddings {limit}")
        engine = getattr(self, "_engine", None)
        if engine is None or engine.max_len < length:
            if engine is not None:
                engine.stop()
            self._engine = Engine(self, max_batch=1, max_len=min(limit, max(1024, 1 << (length - 1).bit_length())))
            self._engine.start()
        return self._engine


def read_config(path: str | os.PathLike, step: folders.Step = "latest") -> NVLMConfig:
    """The config of any checkpoint `load_pretrained` reads, without reading weights.

    For a Hugging Face folder this is `NVLMConfig.from_hf` (the release's 7 dummy ViT heads
    assumed); `load_pretrained` refines it from the tensors and the tokenizer.
    """
    return restore_lib.read_config(path, step)


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
    dtype: str | None = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    *,
    step: folders.Step = "latest",
    rules: LogicalRules = DEFAULT_RULES,
    drop_dummy_heads: bool = False,
    progress: bool = False,
    check_finite: bool = True,
    verify: bool = False,
    merge_lora: bool = True,
    quantize: str | None = None,
    layer_layout: str = "auto",
) -> NVLMModel:
    """Loads an NVLM model from any checkpoint (see `nvlm_jax.checkpoint.folders`).

    Args:
      path: an NVLM-D release-layout folder (`config.json` + safetensors [+ index] + tokenizer
        files; converted on the fly, one param at a time), a folder written by
        `nvlm_jax.convert` (`nvlm_config.json` + `params/`), a training workdir
        (`checkpoints/<step>/`) or one `checkpoints/<step>` folder; local, `file://` or a
        remote scheme such as `gs://` (with its fsspec backend installed).
      dtype: params are stored and computed in this dtype ("bfloat16", or "float32" for
        parity); None = the checkpoint's own (`param_dtype`; bfloat16 for a Hugging Face folder).
      mesh: place the params sharded over this mesh by the logical-axis `rules`; None = first device.
      step: training workdirs: "latest" (complete) checkpoint, "best" (by the run's keep-best
        metric) or a step number.
      drop_dummy_heads: HF folders only: slice the verified-zero dummy ViT heads away.
      progress: HF folders only: draw a progress bar.
      check_finite: HF folders only: `NonFiniteError` naming the first tensor holding NaN/Inf.
      verify: converted folders only: check every file against the folder's sha256 manifest
        first (`ManifestError` naming each missing, extra or damaged file).
      merge_lora: a model trained with LoRA adapters gets them folded into its weights (f32
        sum, then `dtype`): inference then costs what the base model costs. False keeps them
        apart (`config.lora` set, params with `lora_a` / `lora_b`).
      quantize: "int8" / "int4": weight-only quantized Linear kernels (see
        `nvlm_jax.models.quantize`). An HF folder is quantized slab by slab on the host while it
        streams; unquantized Orbax params are quantized on their devices one kernel at a time; a
        folder converted with `--quantize` loads as stored (None also loads it as stored).
      layer_layout: how the decoder layers' params are held for inference: "stacked" (as
        stored), "per_layer" (NVLM-D; separate arrays, faster decode on CPU) or "auto" (per-layer
        for NVLM-D on CPU, else stacked); see `nvlm_jax.models.layer_layout`.

    Raises:
      CheckpointNotFoundError (a FileNotFoundError) when `path` or the step does not exist,
      ValueError when `path` is no checkpoint kind or does not fit its config.
    """
    info = restore_lib.read_info(path, step)
    loc = info.located
    if verify:
        if loc.kind != "converted":
            raise ValueError(f"{loc.path}: verify=True checks the manifest of a converted folder; this is a "
                             f"{loc.describe()}")
        verify_manifest(_local_root(loc, "a converted folder to verify"))
    check_mode(quantize)
    if layer_layout not in ("auto", "stacked", "per_layer"):
        raise ValueError(f"layer_layout must be 'auto', 'stacked' or 'per_layer', got {layer_layout!r}")
    if loc.kind == "hf":
        cfg, params = load_hf_params(_local_root(loc), dtype or "bfloat16", mesh,
                                     drop_dummy_heads=drop_dummy_heads, progress=progress, rules=rules,
                                     check_finite=check_finite, quantize=quantize)
    else:
        cfg = restore_lib.with_dtype(info.config, dtype) if dtype else info.config
        if quantize is not None and cfg.quantize not in (None, quantize):
            raise ValueError(f"{loc.path}: params are stored quantized as {cfg.quantize}; they cannot be "
                             f"re-quantized to {quantize} (load with quantize=None or {cfg.quantize!r})")
        params, _ = restore_lib.load_params(loc, cfg, mesh, rules)
        if cfg.lora.rank and merge_lora:
            params, cfg = lora_lib.merge(params, cfg)
        if quantize is not None and cfg.quantize is None:
            cfg, params = quantize_params(params, cfg, quantize, mesh, rules)
    layout = layout_lib.auto_layout(cfg) if layer_layout == "auto" else layer_layout
    cfg, params = layout_lib.to_layout(params, cfg, layout, mesh, rules)
    tokenizer = tokenizer_from_spec(info.tokenizer) if info.tokenizer is not None else None
    return NVLMModel(cfg, params, tokenizer, mesh, rules, prompt_format=info.prompt_format, source=loc)


def _local_root(loc: folders.Located, what: str = "a Hugging Face folder"):
    """A Hugging Face folder as a local path (safetensors are memory-mapped)."""
    from nvlm_jax.checkpoint.paths import local_path

    return local_path(loc.root, what)

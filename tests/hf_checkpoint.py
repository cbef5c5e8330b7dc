"""A tiny random NVLM-D checkpoint in the release's Hugging Face layout, and torch references.

`write_release(folder, torch_model, ...)` renames/fuses the weights of `torch_reference.TorchNVLMD`
(transformers' InternVL vision model + `mlp1` + Qwen2ForCausalLM) into the keys of the NVLM-D-72B
release: `vision_model.encoder.layers.{i}.attn.qkv.weight` (fused [Q; K; V] rows), `norm1`,
`ls1`, `attn.proj`, `embeddings.class_embedding` [1, 1, C], ..., `mlp1.*`,
`language_model.*`; optionally pads the ViT with zero dummy heads like the release; stores the
tensors the release keeps in float32 as F32 and the rest as BF16 (the torch model's weights are
first rounded to bf16 so both sides hold the same numbers); writes sharded safetensors with the
official `safetensors.torch` writer, `model.safetensors.index.json`, a release-format
`config.json` (the real 72B config with tiny sizes) and the tiny tokenizer.

`torch_greedy` is the reference decoding loop: full recomputation each step, image features
scattered into the prompt's context tokens only.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from nvlm_jax import config as C
from nvlm_jax.processing.tokenizer import build_tiny_backend, make_tiny_tokenizer
from tests import torch_reference as ref

REFERENCE_CONFIG = Path("/work/shared/reference/nvlm_d_72b_config.json")
if not REFERENCE_CONFIG.is_file():
    REFERENCE_CONFIG = Path(__file__).resolve().parents[2] / "shared/reference/nvlm_d_72b_config.json"

# Tensors the release stores in float32 (NVLM_REFERENCE §5.3).
FP32_PATTERN = re.compile(
    r"self_attn\.[qkv]_proj\.(weight|bias)$|attn\.qkv\.weight$|attn\.proj\.weight$|attn\.[qk]_norm\.weight$"
)
TINY_VOCAB = 1024


@functools.cache
def tiny_special_ids() -> dict[str, int]:
    backend = build_tiny_backend()
    names = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
             "vision_pad": "<|vision_pad|>"}
    return {k: backend.token_to_id(v) for k, v in names.items()}


def tiny_cfg() -> C.NVLMConfig:
    """`C.tiny("D")` with a vocabulary that holds the tiny tokenizer (its `<|vision_pad|>` is the
    image context token). Fields a release config.json cannot express (the H-only
    `max_tag_tokens`) keep the reader's default, so `NVLMConfig.from_hf` gives this config back."""
    base = C.tiny("D")
    llm = dataclasses.replace(base.llm, vocab_size=TINY_VOCAB)
    return base.replace(llm=llm, image_context_token_id=tiny_special_ids()["vision_pad"],
                        max_tag_tokens=C.NVLMConfig().max_tag_tokens)


def round_to_bf16_(module: torch.nn.Module) -> None:
    """Rounds every parameter to the nearest bf16 value (kept in float32)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def release_state(model: ref.TorchNVLMD, dummy_heads: int = 0) -> dict[str, np.ndarray]:
    """The release's key → float32 array for a `TorchNVLMD`, with `dummy_heads` zero ViT heads."""
    cfg = model.cfg.vision
    h, d, c = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    total = h + dummy_heads
    sd = {k: _np(v) for k, v in model.vision_model.state_dict().items()}
    out: dict[str, np.ndarray] = {}
    v = "vision_model."
    out[v + "embeddings.class_embedding"] = sd["embeddings.cls_token"]
    out[v + "embeddings.position_embedding"] = sd["embeddings.position_embeddings"]
    out[v + "embeddings.patch_embedding.weight"] = sd["embeddings.patch_embeddings.projection.weight"]
    out[v + "embeddings.patch_embedding.bias"] = sd["embeddings.patch_embeddings.projection.bias"]

    def pad_rows(w):  # (h·d, ...) → (total·d, ...), zero rows for dummy heads
        return np.concatenate([w, np.zeros((dummy_heads * d,) + w.shape[1:], w.dtype)])

    for i in range(cfg.num_layers):
        src, dst = f"encoder.layer.{i}.", f"{v}encoder.layers.{i}."
        qkv = [pad_rows(sd[src + f"attention.{n}_proj.weight"]) for n in "qkv"]
        out[dst + "attn.qkv.weight"] = np.concatenate(qkv)
        out[dst + "attn.q_norm.weight"] = pad_rows(sd[src + "attention.q_norm.weight"])
        out[dst + "attn.k_norm.weight"] = pad_rows(sd[src + "attention.k_norm.weight"])
        proj = sd[src + "attention.projection_layer.weight"]
        out[dst + "attn.proj.weight"] = np.concatenate([proj, np.zeros((c, dummy_heads * d), proj.dtype)], 1)
        out[dst + "attn.proj.bias"] = sd[src + "attention.projection_layer.bias"]
        out[dst + "norm1.weight"] = sd[src + "layernorm_before.weight"]
        out[dst + "norm2.weight"] = sd[src + "layernorm_after.weight"]
        out[dst + "ls1"] = sd[src + "lambda_1"]
        out[dst + "ls2"] = sd[src + "lambda_2"]
        for n in ("fc1", "fc2"):
            out[dst + f"mlp.{n}.weight"] = sd[src + f"mlp.{n}.weight"]
            out[dst + f"mlp.{n}.bias"] = sd[src + f"mlp.{n}.bias"]
    assert out[v + "encoder.layers.0.attn.qkv.weight"].shape == (3 * total * d, c)
    for k, t in model.projector.state_dict().items():
        out[k] = _np(t)  # mlp1.0.weight, mlp1.1.weight, ...
    for k, t in model.language_model.state_dict().items():
        out["language_model." + k] = _np(t)
    return out


def release_config(cfg: C.NVLMConfig, special: dict[str, int]) -> dict:
    """The real NVLM-D-72B `config.json` with `cfg`'s (tiny) sizes."""
    c = json.loads(REFERENCE_CONFIG.read_text())
    lc, vc = c["llm_config"], c["vision_config"]
    m, v = cfg.llm, cfg.vision
    lc.update(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
              intermediate_size=m.intermediate_size, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
              max_position_embeddings=m.max_position_embeddings, bos_token_id=special["endoftext"],
              eos_token_id=special["im_end"], _name_or_path="tiny-qwen2")
    vc.update(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
              intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size)
    c["force_image_size"] = v.image_size
    return c


def write_release(
    folder: Path,
    model: ref.TorchNVLMD,
    *,
    dummy_heads: int = 2,
    num_shards: int = 3,
    fp32_pattern: re.Pattern | None = FP32_PATTERN,
    tokenizer: bool = True,
    state: dict[str, np.ndarray] | None = None,
) -> Path:
    """Writes `model` as a release-layout folder; returns it. `state` overrides the tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    state = release_state(model, dummy_heads) if state is None else state
    keys = list(state)
    chunks = np.array_split(np.arange(len(keys)), num_shards)
    weight_map, total = {}, 0
    for n, idx in enumerate(chunks):
        name = f"model-{n + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {}
        for i in idx:
            k = keys[i]
            t = torch.from_numpy(np.ascontiguousarray(state[k]))
            stored = torch.float32 if fp32_pattern is not None and fp32_pattern.search(k) else torch.bfloat16
            tensors[k] = t.to(stored).contiguous()
            weight_map[k] = name
            total += tensors[k].numel() * tensors[k].element_size()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    special = tiny_special_ids()
    (folder / "config.json").write_text(json.dumps(release_config(model.cfg, special), indent=2))
    if tokenizer:
        make_tiny_tokenizer(folder)
    return folder


def _tempdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@dataclasses.dataclass(frozen=True)
class TinyRelease:
    """A written tiny checkpoint: its folder, the torch model it holds and that model's config."""

    folder: Path
    torch_model: ref.TorchNVLMD
    cfg: C.NVLMConfig


@functools.cache
def tiny_release(seed: int = 7, dummy_heads: int = 2) -> TinyRelease:
    """Built once per process (shared by the test modules), in a temp dir removed at exit."""
    cfg = tiny_cfg()
    model = ref.TorchNVLMD(cfg, seed=seed)
    round_to_bf16_(model)
    folder = write_release(_tempdir("nvlm_tiny_release_") / "hf", model, dummy_heads=dummy_heads)
    return TinyRelease(folder, model, cfg)


@functools.cache
def tiny_converted(seed: int = 7, dummy_heads: int = 2, dtype: str = "float32") -> Path:
    """`tiny_release` converted to our Orbax format (once per process)."""
    from nvlm_jax import convert

    release = tiny_release(seed, dummy_heads)
    return convert.convert(release.folder, _tempdir("nvlm_tiny_orbax_") / "ckpt", dtype=dtype, progress=False)


def copy_release(release: TinyRelease, dest: Path) -> Path:
    shutil.copytree(release.folder, dest)
    return dest


def prompt_ids(cfg: C.NVLMConfig, tiles_per_image: list[int], seed: int = 0, text: int = 5) -> np.ndarray:
    """[seq] ids shaped like a prompt: text, then per image tag-like text and per tile the
    context tokens, then text. Text ids avoid the special tokens."""
    rng = np.random.default_rng(seed)
    words = lambda n: list(rng.integers(1, 900, n))  # noqa: E731
    ids = words(text)
    for t in tiles_per_image:
        ids += words(2)
        for _ in range(t):
            ids += words(3) + [cfg.image_context_token_id] * cfg.num_image_tokens
        ids += words(2)
    return np.asarray(ids + words(text), np.int32)


@torch.no_grad()
def torch_greedy(
    model: ref.TorchNVLMD, input_ids: np.ndarray, pixels_nhwc: np.ndarray | None, steps: int
) -> np.ndarray:
    """Greedy continuation [steps] of one prompt [seq] by full recomputation each step."""
    lm = model.language_model
    ids = torch.from_numpy(np.asarray(input_ids)).long()
    emb = lm.get_input_embeddings()(ids[None])[0]
    if pixels_nhwc is not None:
        pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels_nhwc, np.float32).transpose(0, 3, 1, 2)))
        vit = model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        g = int(vit.shape[1] ** 0.5)
        vit = ref.torch_pixel_shuffle_v2(vit.reshape(vit.shape[0], g, g, -1), model.cfg.downsample_ratio)
        feats = model.projector.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))
        emb = emb.clone()
        emb[ids == model.cfg.image_context_token_id] = feats.reshape(-1, emb.shape[-1])
    out = []
    for _ in range(steps):
        logits = lm(inputs_embeds=emb[None]).logits[0, -1]
        tok = int(torch.argmax(logits))
        out.append(tok)
        emb = torch.cat([emb, lm.get_input_embeddings()(torch.tensor([tok]))], 0)
    return np.asarray(out, np.int32)


def standalone_vit_state(model: ref.TorchNVLMD) -> dict[str, np.ndarray]:
    """The ViT of `model` in OpenGVLab's standalone InternViT layout (no prefix, no dummy heads)."""
    state = release_state(model, 0)
    return {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}


def standalone_vit_config(cfg: C.NVLMConfig) -> dict:
    vc = copy.deepcopy(json.loads(REFERENCE_CONFIG.read_text())["vision_config"])
    v = cfg.vision
    vc.update(hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
              intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size)
    return vc


def write_standalone(folder: Path, state: dict[str, np.ndarray], config: dict, tokenizer: bool = False) -> Path:
    """One-file standalone checkpoint (`model.safetensors` + `config.json` [+ tokenizer])."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in state.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        make_tiny_tokenizer(folder)
    return folder


def flat_params(tree) -> dict[str, np.ndarray]:
    """`{"a/b/c": array}` of a params tree."""
    import jax

    return {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def strip_dummy_heads(params, real: int) -> dict[str, np.ndarray]:
    """Our params, flat, with the dummy ViT heads sliced away (after checking they are zero)."""
    from nvlm_jax import weight_map as wm

    flat = flat_params(params)
    for path, axis in wm.VIT_HEAD_AXES.items():
        name = "/".join(path)
        if name in flat:
            x = flat[name]
            extra = x[wm.heads_slice(x.ndim, axis + 1, real)]
            assert not np.any(extra), name
            flat[name] = x[wm.heads_slice(x.ndim, axis + 1, 0, real)]
    return flat


def torch_from_release(folder: Path, image_context_token_id: int | None = None) -> ref.TorchNVLMD:
    """A `TorchNVLMD` holding the weights of a release-layout folder (the inverse of
    `release_state`: the ViT's fused qkv split, zero dummy heads dropped), every tensor loaded
    strictly, so a key or shape the release code would not accept fails here."""
    from safetensors.torch import load_file

    cfg = C.NVLMConfig.from_hf(folder / "config.json")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict[str, np.ndarray] = {}
    for name in sorted(set(index.values())):
        state.update({k: t.float().numpy() for k, t in load_file(str(folder / name)).items()})
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, num_dummy_heads=0))  # the torch ViT has none
    if image_context_token_id is not None:  # the release takes it from its tokenizer at run time
        cfg = cfg.replace(image_context_token_id=image_context_token_id)
    model = ref.TorchNVLMD(cfg, seed=0)
    v, h, d = cfg.vision, cfg.vision.num_heads, cfg.vision.head_dim
    real = h * d
    vit: dict[str, np.ndarray] = {
        "embeddings.cls_token": state.pop("vision_model.embeddings.class_embedding"),
        "embeddings.position_embeddings": state.pop("vision_model.embeddings.position_embedding"),
        "embeddings.patch_embeddings.projection.weight": state.pop("vision_model.embeddings.patch_embedding.weight"),
        "embeddings.patch_embeddings.projection.bias": state.pop("vision_model.embeddings.patch_embedding.bias"),
    }
    for i in range(v.num_layers):
        src, dst = f"vision_model.encoder.layers.{i}.", f"encoder.layer.{i}."
        qkv = state.pop(src + "attn.qkv.weight")
        for n, part in zip("qkv", np.split(qkv, 3), strict=True):
            vit[dst + f"attention.{n}_proj.weight"] = part[:real]
        vit[dst + "attention.q_norm.weight"] = state.pop(src + "attn.q_norm.weight")[:real]
        vit[dst + "attention.k_norm.weight"] = state.pop(src + "attn.k_norm.weight")[:real]
        vit[dst + "attention.projection_layer.weight"] = state.pop(src + "attn.proj.weight")[:, :real]
        vit[dst + "attention.projection_layer.bias"] = state.pop(src + "attn.proj.bias")
        vit[dst + "layernorm_before.weight"] = state.pop(src + "norm1.weight")
        vit[dst + "layernorm_after.weight"] = state.pop(src + "norm2.weight")
        vit[dst + "lambda_1"] = state.pop(src + "ls1")
        vit[dst + "lambda_2"] = state.pop(src + "ls2")
        for n in ("fc1", "fc2"):
            vit[dst + f"mlp.{n}.weight"] = state.pop(src + f"mlp.{n}.weight")
            vit[dst + f"mlp.{n}.bias"] = state.pop(src + f"mlp.{n}.bias")
    projector = {k: state.pop(k) for k in [k for k in state if k.startswith("mlp1.")]}
    llm_keys = [k for k in state if k.startswith("language_model.")]
    llm = {k.removeprefix("language_model."): state.pop(k) for k in llm_keys}
    if state:
        raise ValueError(f"{folder}: tensors with no place in the release model: {sorted(state)[:5]}")
    for module, tensors in ((model.vision_model, vit), (model.projector, projector), (model.language_model, llm)):
        sd = {k: torch.from_numpy(np.ascontiguousarray(t)) for k, t in tensors.items()}
        module.load_state_dict(sd, strict=True)
    return model.float()

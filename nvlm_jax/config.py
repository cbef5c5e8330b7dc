"""Model configuration: one frozen dataclass per component, presets, and the HF config reader.

The presets for released checkpoints equal what `NVLMConfig.from_hf` builds from the
checkpoint's own `config.json` (tested against the NVLM-D-72B config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

Arch = Literal["D", "X", "H"]
ARCHS = ("D", "X", "H")

# Token the released NVLM-D replaces with image features (`<|vision_pad|>` in the Qwen2 vocab).
QWEN2_IMAGE_CONTEXT_TOKEN_ID = 151654

# The NVLM release pads the 25-head InternViT-6B to 32 heads with zero heads so that heads
# shard 8 ways. This is hard-coded in its modelling code, not stored in config.json.
NVLM_VIT_DUMMY_HEADS = 7


def _check_fields(obj: Any, what: str, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Named errors for values of the wrong type (JSON strings, bools for ints, NaN) or range.

    Types come from the field annotations: "int" (not bool), "float" (any finite real), "bool"."""
    for field in dataclasses.fields(obj):
        value, kind = getattr(obj, field.name), str(field.type)
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{what}.{field.name} must be an integer, got {type(value).__name__} {value!r}")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, int | float)
                                or not math.isfinite(value)):
            raise ValueError(f"{what}.{field.name} must be a finite number, got {type(value).__name__} {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{what}.{field.name} must be true or false, got {type(value).__name__} {value!r}")
    for name in positive:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{what}.{name} must be > 0, got {getattr(obj, name)!r}")
    for name in non_negative:
        if not getattr(obj, name) >= 0:
            raise ValueError(f"{what}.{name} must be >= 0, got {getattr(obj, name)!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT encoder. `num_heads` counts real heads; `num_dummy_heads` zero heads pad them."""

    hidden_size: int = 3200
    num_layers: int = 45
    num_heads: int = 25
    num_dummy_heads: int = 0
    intermediate_size: int = 12800
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: Literal["rms_norm", "layer_norm"] = "rms_norm"
    norm_eps: float = 1e-6
    qk_normalization: bool = True
    qkv_bias: bool = False
    layer_scale_init: float = 0.1
    # Which layer's output feeds the projector, as in HF `hidden_states[select_layer]`
    # (-1 = the last layer; index 0 would be the embeddings).
    select_layer: int = -1
    # Bicubic-interpolate the learned position table when tiles are not `image_size` pixels.
    interpolate_pos_embed: bool = False

    def __post_init__(self):
        _check_fields(self, "vision", positive=("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                "image_size", "patch_size", "num_channels", "norm_eps"),
                      non_negative=("num_dummy_heads",))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"vision norm_type must be rms_norm or layer_norm, got {self.norm_type!r}")
        if not (-self.num_layers <= self.select_layer <= -1 or 1 <= self.select_layer <= self.num_layers):
            raise ValueError(
                f"vision select_layer {self.select_layer} is outside [-{self.num_layers}, -1] "
                f"and [1, {self.num_layers}]"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def total_heads(self) -> int:
        return self.num_heads + self.num_dummy_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1

    @property
    def layers_used(self) -> int:
        """How many encoder layers run to produce the selected hidden state."""
        if self.select_layer < 0:
            return self.num_layers + 1 + self.select_layer
        return self.select_layer


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Qwen2 / Llama-family decoder."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    num_layers: int = 80
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 29568
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    family: Literal["qwen2", "llama"] = "qwen2"

    def __post_init__(self):
        _check_fields(self, "llm", positive=("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                             "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta",
                                             "max_position_embeddings"))
        if self.family not in ("qwen2", "llama"):
            raise ValueError(f"llm family must be qwen2 or llama, got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"llm num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"llm head_dim {self.head_dim} must be even for rotary embeddings")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Vision → LLM projector. D and H: LayerNorm → Linear → GELU → Linear; X: one Linear."""

    input_size: int = 12800
    hidden_size: int = 29568
    output_size: int = 8192
    num_layers: Literal[1, 2] = 2
    norm_eps: float = 1e-5

    def __post_init__(self):
        _check_fields(self, "projector", positive=("input_size", "hidden_size", "output_size", "norm_eps"))
        if self.num_layers not in (1, 2):
            raise ValueError(f"projector num_layers must be 1 or 2, got {self.num_layers!r}")


LORA_TARGETS = ("llm", "llm_attention", "llm_mlp", "vision", "projector")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA): `W x + (alpha / rank) * B(A(dropout(x)))`, B initialised to zero.

    rank: 0 = no adapters. param_dtype: the adapters' storage dtype (f32 by default, also under a
    bf16 base, as PEFT keeps them). targets: which projections get adapters: "llm" (the decoder layers'
    attention q/k/v/o and MLP gate/up/down), "llm_attention" / "llm_mlp" (one of the two),
    "vision" (the ViT's qkv/proj/fc1/fc2), "projector" (its linear layers). A targeted part's base
    weights are frozen; its adapters train (see `nvlm_jax.train.freeze`).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("llm",)
    param_dtype: str = "float32"

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets if t.strip()))
        _check_fields(self, "lora", non_negative=("rank",))
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"lora.param_dtype must be float32, bfloat16 or float16, got {self.param_dtype!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or (self.rank and not self.targets):
            raise ValueError(f"lora.targets must be a non-empty subset of {LORA_TARGETS}, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def on(self, part: str) -> LoraConfig | None:
        """This config where `part` ("llm_attention", "llm_mlp", "vision", "projector") is
        targeted and rank > 0, else None (no adapters there)."""
        if not self.rank:
            return None
        llm = part in ("llm_attention", "llm_mlp") and "llm" in self.targets
        return self if llm or part in self.targets else None


@dataclasses.dataclass(frozen=True)
class NVLMConfig:
    """A whole NVLM model: vision encoder, projector, decoder and how they are joined."""

    arch: Arch = "D"
    vision: VisionConfig = VisionConfig()
    llm: LLMConfig = LLMConfig()
    projector: ProjectorConfig = ProjectorConfig()
    downsample_ratio: float = 0.5
    ps_version: Literal["v1", "v2"] = "v2"
    image_context_token_id: int = QWEN2_IMAGE_CONTEXT_TOKEN_ID
    # NVLM-X/H: one gated cross-attention block after every `xattn_every` decoder layers.
    xattn_every: int | None = None
    # NVLM-H: memory slots for each tile's tag tokens (`<tile_k>` is 5 Qwen2 tokens).
    max_tag_tokens: int = 5
    max_tiles: int = 6
    use_thumbnail: bool = True
    template: str = "chatml"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype
    attention_impl: Literal["auto", "xla", "pallas"] = "xla"
    remat_policy: Literal["none", "full", "dots"] = "none"
    lora: LoraConfig = LoraConfig()
    # Weight-only quantized Linear kernels: None, "int8" or "int4" (see nvlm_jax/models/quantize.py).
    quantize: str | None = None
    # How the decoder layers' params are held: "stacked" (`llm/layers`, one `[layers, ...]` tree run
    # by a scan: checkpoints, training) or "per_layer" (`llm/layer_0` ... : separate arrays; decoding
    # runs them as an unrolled loop, a plain forward as a switch inside the scan; NVLM-D inference
    # on CPU, see nvlm_jax/models/layer_layout.py, which converts params between them).
    layer_layout: Literal["stacked", "per_layer"] = "stacked"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"config.quantize must be None, 'int8' or 'int4', got {self.quantize!r}")
        _check_fields(self, "config", positive=("downsample_ratio", "max_tag_tokens", "max_tiles"),
                      non_negative=("image_context_token_id",))
        if self.xattn_every is not None and (isinstance(self.xattn_every, bool) or not isinstance(self.xattn_every, int)
                                             or self.xattn_every < 1):
            raise ValueError(f"config.xattn_every must be a positive integer or None, got {self.xattn_every!r}")
        if self.layer_layout not in ("stacked", "per_layer"):
            raise ValueError(f"config.layer_layout must be 'stacked' or 'per_layer', got {self.layer_layout!r}")
        if self.layer_layout == "per_layer" and self.arch != "D":
            raise ValueError(f"config.layer_layout='per_layer' is for NVLM-D; NVLM-{self.arch} interleaves "
                             "cross-attention groups and keeps 'stacked'")
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be v1 or v2, got {self.ps_version!r}")
        scale = round(1 / self.downsample_ratio)
        if abs(scale * self.downsample_ratio - 1) > 1e-9 or self.vision.grid_size % scale:
            raise ValueError(
                f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the "
                f"{self.vision.grid_size}-patch grid"
            )
        expected_in = self.vision.hidden_size * scale**2
        if self.projector.input_size != expected_in:
            raise ValueError(
                f"projector input_size {self.projector.input_size} != vision hidden_size "
                f"{self.vision.hidden_size} x {scale}^2 = {expected_in}"
            )
        if self.projector.output_size != self.llm.hidden_size:
            raise ValueError(
                f"projector output_size {self.projector.output_size} != llm hidden_size "
                f"{self.llm.hidden_size}"
            )
        if self.arch in ("X", "H"):
            if not self.xattn_every or self.llm.num_layers % self.xattn_every:
                raise ValueError(
                    f"arch {self.arch} needs xattn_every dividing llm num_layers "
                    f"{self.llm.num_layers}, got {self.xattn_every}"
                )

    @property
    def shuffle_scale(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        """Decoder tokens per tile after pixel shuffle (256 for 448-pixel tiles)."""
        return (self.vision.grid_size // self.shuffle_scale) ** 2

    def replace(self, **changes) -> NVLMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), so a dict read back from a checkpoint compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NVLMConfig:
        d = dict(d)
        d["vision"] = VisionConfig(**d.get("vision", {}))
        d["llm"] = LLMConfig(**d.get("llm", {}))
        d["projector"] = ProjectorConfig(**d.get("projector", {}))
        d["lora"] = LoraConfig(**d.get("lora", {}))
        return cls(**d)

    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict[str, Any], **overrides) -> NVLMConfig:
        """Reads a Hugging Face NVLM-D `config.json` (path, folder, or parsed dict)."""
        source = "config dict"
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            try:
                with open(path) as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read HF config {path}: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        try:
            return _from_hf_dict(config, source, **overrides)
        except (TypeError, ValueError) as e:
            message = str(e)
            raise ValueError(message if message.startswith(source) else f"{source}: {message}") from e


def _as_float(value: Any) -> Any:
    """JSON numbers as float (the field's type); anything else is left for the field check to name."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _positive_ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _require(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d:
        raise ValueError(f"{source}: missing key {key!r}")
    return d[key]


def _from_hf_dict(c: dict[str, Any], source: str, **overrides) -> NVLMConfig:
    model_type = c.get("model_type")
    archs = c.get("architectures") or []
    if model_type != "NVLM_D" and "NVLM_D" not in archs:
        raise ValueError(
            f"{source}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
            "expected an NVLM_D config"
        )
    v = _require(c, "vision_config", source)
    lc = _require(c, "llm_config", source)
    for key, value in (("vision_config", v), ("llm_config", lc)):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be a JSON object, got {type(value).__name__}")
    llm_arch = (lc.get("architectures") or ["?"])[0]
    if llm_arch == "Qwen2ForCausalLM":
        family, default_bias = "qwen2", True
    elif llm_arch == "LlamaForCausalLM":
        family, default_bias = "llama", False
    else:
        raise ValueError(f"{source}: unsupported llm architecture {llm_arch!r}")
    if v.get("qkv_bias"):
        raise ValueError(f"{source}: vision qkv_bias=true is not supported by this port")
    hidden = _require(lc, "hidden_size", source)
    n_heads = _require(lc, "num_attention_heads", source)
    llm = LLMConfig(
        vocab_size=_require(lc, "vocab_size", source),
        hidden_size=hidden,
        num_layers=_require(lc, "num_hidden_layers", source),
        num_heads=n_heads,
        num_kv_heads=lc.get("num_key_value_heads", n_heads),
        head_dim=lc.get("head_dim") or (hidden // n_heads if _positive_ints(hidden, n_heads) else None),
        intermediate_size=_require(lc, "intermediate_size", source),
        rms_norm_eps=lc.get("rms_norm_eps", 1e-6),
        rope_theta=_as_float(lc.get("rope_theta", 10000.0)),
        qkv_bias=lc.get("attention_bias", default_bias) if family == "llama" else True,
        tie_word_embeddings=bool(lc.get("tie_word_embeddings", False)),
        max_position_embeddings=lc.get("max_position_embeddings", 32768),
        family=family,
    )
    vision = VisionConfig(
        hidden_size=_require(v, "hidden_size", source),
        num_layers=_require(v, "num_hidden_layers", source),
        num_heads=_require(v, "num_attention_heads", source),
        num_dummy_heads=NVLM_VIT_DUMMY_HEADS,
        intermediate_size=_require(v, "intermediate_size", source),
        image_size=v.get("image_size", 448),
        patch_size=v.get("patch_size", 14),
        num_channels=v.get("num_channels", 3),
        norm_type=v.get("norm_type", "rms_norm"),
        norm_eps=v.get("layer_norm_eps", 1e-6),
        qk_normalization=bool(v.get("qk_normalization", True)),
        qkv_bias=False,
        layer_scale_init=v.get("initializer_factor", 0.1),
        select_layer=c.get("select_layer", -1),
    )
    ratio = _as_float(c.get("downsample_ratio", 0.5))
    if not isinstance(ratio, float) or not 0 < ratio <= 1:
        raise ValueError(f"{source}: downsample_ratio must be a number in (0, 1], got {ratio!r}")
    scale = round(1 / ratio)
    projector = ProjectorConfig(
        input_size=vision.hidden_size * scale**2,
        hidden_size=llm.intermediate_size,
        output_size=llm.hidden_size,
        num_layers=2,
    )
    fields = dict(
        arch="D",
        vision=vision,
        llm=llm,
        projector=projector,
        downsample_ratio=ratio,
        ps_version=c.get("ps_version", "v1"),
        max_tiles=c.get("max_dynamic_patch", 6),
        use_thumbnail=bool(c.get("use_thumbnail", True)),
        template=c.get("template", "chatml"),
    )
    fields.update(overrides)
    return NVLMConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Presets


def _internvit_6b(num_dummy_heads: int = NVLM_VIT_DUMMY_HEADS) -> VisionConfig:
    return VisionConfig(num_dummy_heads=num_dummy_heads)


def _qwen2_72b() -> LLMConfig:
    return LLMConfig()


def _yi_34b() -> LLMConfig:
    # Nous-Hermes-2-Yi-34B: Llama architecture, no qkv bias. Its 64000-token vocab has no image
    # context token: NVLM-D-34B adds one at id 64000, and the table is padded to 64128 rows so
    # the vocab axis shards evenly.
    return LLMConfig(
        vocab_size=64128,
        hidden_size=7168,
        num_layers=60,
        num_heads=56,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=20480,
        rms_norm_eps=1e-5,
        rope_theta=5_000_000.0,
        qkv_bias=False,
        max_position_embeddings=4096,
        family="llama",
    )


def _projector_for(vision: VisionConfig, llm: LLMConfig, arch: Arch) -> ProjectorConfig:
    return ProjectorConfig(
        input_size=vision.hidden_size * 4,
        hidden_size=llm.intermediate_size,
        output_size=llm.hidden_size,
        num_layers=1 if arch == "X" else 2,
    )


def nvlm_d_72b() -> NVLMConfig:
    """NVLM-D-72B as released (InternViT-6B with 7 dummy heads + Qwen2-72B-Instruct)."""
    vision, llm = _internvit_6b(), _qwen2_72b()
    return NVLMConfig(arch="D", vision=vision, llm=llm, projector=_projector_for(vision, llm, "D"))


def nvlm_d_34b() -> NVLMConfig:
    """NVLM-D-34B (Nous-Hermes-2-Yi-34B backbone, paper Tables 12–13; not released)."""
    vision, llm = _internvit_6b(), _yi_34b()
    return NVLMConfig(
        arch="D",
        vision=vision,
        llm=llm,
        projector=_projector_for(vision, llm, "D"),
        image_context_token_id=64000,
    )


def _with_xattn(base: NVLMConfig, arch: Arch, every: int) -> NVLMConfig:
    return base.replace(arch=arch, xattn_every=every,
                        projector=_projector_for(base.vision, base.llm, arch))


def nvlm_x_72b() -> NVLMConfig:
    """NVLM-X-72B (paper): one-layer projector, a gated cross-attention block every 8 layers."""
    return _with_xattn(nvlm_d_72b(), "X", 8)


def nvlm_h_72b() -> NVLMConfig:
    """NVLM-H-72B (paper): thumbnail in the decoder, tiles by cross-attention every 8 layers."""
    return _with_xattn(nvlm_d_72b(), "H", 8)


def nvlm_x_34b() -> NVLMConfig:
    return _with_xattn(nvlm_d_34b(), "X", 6)


def nvlm_h_34b() -> NVLMConfig:
    return _with_xattn(nvlm_d_34b(), "H", 6)


def tiny(arch: Arch = "D", **overrides) -> NVLMConfig:
    """A tiny model for tests and the CPU main job: 2-layer ViT on 28-pixel tiles, 2-layer LLM.

    Tiles are 28 px with 7 px patches (a 4×4 grid) so pixel shuffle gives 4 tokens per tile.
    Head counts are even so every parameter shards over a tensor axis of 2.
    """
    vision = VisionConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_dummy_heads=0,
        intermediate_size=64,
        image_size=28,
        patch_size=7,
    )
    llm = LLMConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    )
    fields = dict(
        arch=arch,
        vision=vision,
        llm=llm,
        projector=_projector_for(vision, llm, arch),
        image_context_token_id=llm.vocab_size - 1,
        xattn_every=1 if arch in ("X", "H") else None,
        max_tag_tokens=8,
    )
    fields.update(overrides)
    return NVLMConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Parameter counting (analytic; tests check it against the real parameter tree).


def vision_param_count(v: VisionConfig) -> int:
    c, hd, heads = v.hidden_size, v.head_dim, v.total_heads
    width = heads * hd
    norm = c if v.norm_type == "rms_norm" else 2 * c
    per_layer = (
        2 * norm  # norm1, norm2
        + c * 3 * width  # fused qkv
        + (3 * width if v.qkv_bias else 0)
        + (2 * width if v.qk_normalization else 0)
        + width * c + c  # proj
        + 2 * c  # ls1, ls2
        + c * v.intermediate_size + v.intermediate_size  # fc1
        + v.intermediate_size * c + c  # fc2
    )
    patch = v.patch_size**2 * v.num_channels * c + c
    return patch + c + v.num_positions * c + v.num_layers * per_layer


def llm_param_count(m: LLMConfig) -> int:
    e, d = m.hidden_size, m.head_dim
    q, kv = m.num_heads * d, m.num_kv_heads * d
    attn = e * q + 2 * e * kv + q * e + ((q + 2 * kv) if m.qkv_bias else 0)
    mlp = 3 * e * m.intermediate_size
    per_layer = attn + mlp + 2 * e
    head = 0 if m.tie_word_embeddings else m.vocab_size * e
    return m.vocab_size * e + m.num_layers * per_layer + e + head


def projector_param_count(p: ProjectorConfig) -> int:
    if p.num_layers == 1:
        return p.input_size * p.output_size
    return 2 * p.input_size + p.input_size * p.hidden_size + p.hidden_size * p.output_size


def xattn_block_param_count(m: LLMConfig) -> int:
    """One gated cross-attention block: 2 RMSNorms, q/k/v/o (no biases), SwiGLU, 2 gates."""
    e, d = m.hidden_size, m.head_dim
    q, kv = m.num_heads * d, m.num_kv_heads * d
    return 2 * e + e * q + 2 * e * kv + q * e + 3 * e * m.intermediate_size + 2


def param_count(cfg: NVLMConfig) -> int:
    """Number of parameters of `cfg`'s model, computed from shapes (nothing is allocated)."""
    xattn = 0
    if cfg.arch in ("X", "H"):
        xattn = cfg.llm.num_layers // cfg.xattn_every * xattn_block_param_count(cfg.llm)
    return (
        vision_param_count(cfg.vision)
        + llm_param_count(cfg.llm)
        + projector_param_count(cfg.projector)
        + xattn
    )

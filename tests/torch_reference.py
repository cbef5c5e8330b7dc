"""Tiny PyTorch reference models built from the real `transformers` modules, for parity tests.

Only glue lives here: configs, random weights, and the NVLM-D composition (pixel shuffle v2 and
the `mlp1` projector math around transformers' vision model and causal LM), mirroring the
released `modeling_nvlm_d.py` data flow.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers
from flax import linen as nn

from nvlm_jax import config as C
from nvlm_jax.models import nvlm as nvlm_model
from nvlm_jax.weight_map import params_from_tensors


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Fills every parameter with N(0, scale²) (norm/layer-scale weights: 1 ± scale) so that
    parity tests exercise every weight, bias and norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            is_gain = name.endswith("norm.weight") or "layernorm" in name or "lambda_" in name or (
                p.ndim == 1 and "norm" in name and name.endswith("weight"))
            p.copy_((1.0 + noise) if is_gain else noise)


def torch_llm(cfg: C.LLMConfig, seed: int = 0):
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if cfg.family == "qwen2":
        tc = transformers.Qwen2Config(**common)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        tc = transformers.LlamaConfig(attention_bias=cfg.qkv_bias, head_dim=cfg.head_dim, **common)
        model_cls = transformers.LlamaForCausalLM
    tc._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(tc).eval()
    randomize_(model, seed)
    return model


def torch_vit(cfg: C.VisionConfig, seed: int = 0):
    if cfg.num_dummy_heads:
        raise ValueError("transformers' InternVL vision model has no dummy heads")
    vc = transformers.InternVLVisionConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.num_channels, norm_type=cfg.norm_type, layer_norm_eps=cfg.norm_eps,
        use_qk_norm=cfg.qk_normalization, attention_bias=cfg.qkv_bias,
        layer_scale_init_value=cfg.layer_scale_init, use_mean_pooling=True, hidden_act="gelu",
    )
    vc._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.InternVLVisionModel(vc).eval()
    randomize_(model, seed)
    return model


class TorchProjector(torch.nn.Module):
    """NVLM's `mlp1`: LayerNorm → Linear (no bias) → GELU → Linear (no bias), as a Sequential so
    its state-dict keys are `0.*`, `1.*`, `3.*` like the release."""

    def __init__(self, cfg: C.ProjectorConfig, seed: int = 0):
        super().__init__()
        self.mlp1 = torch.nn.Sequential(
            torch.nn.LayerNorm(cfg.input_size, eps=cfg.norm_eps),
            torch.nn.Linear(cfg.input_size, cfg.hidden_size, bias=False),
            torch.nn.GELU(),
            torch.nn.Linear(cfg.hidden_size, cfg.output_size, bias=False),
        )
        randomize_(self, seed)


def torch_pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """The release's pixel_shuffle (ps_version v2) as view/permute steps on [n, w, h, c]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class TorchNVLMD(torch.nn.Module):
    """NVLM-D forward in PyTorch: ViT → drop CLS → pixel shuffle v2 → mlp1 → scatter into the
    embeddings at the context tokens → causal LM."""

    def __init__(self, cfg: C.NVLMConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.vision_model = torch_vit(cfg.vision, seed)
        self.projector = TorchProjector(cfg.projector, seed + 1)
        self.language_model = torch_llm(cfg.llm, seed + 2)

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, pixel_values_nhwc: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values_nhwc.transpose(0, 3, 1, 2)))
        pixels = pixels.to(next(self.vision_model.parameters()).dtype)  # the release casts to bf16
        vit = self.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
        g = int(vit.shape[1] ** 0.5)
        vit = torch_pixel_shuffle_v2(vit.reshape(vit.shape[0], g, g, -1), self.cfg.downsample_ratio)
        feats = self.projector.mlp1(vit.reshape(vit.shape[0], -1, vit.shape[-1]))
        ids = torch.from_numpy(input_ids).long()
        emb = self.language_model.get_input_embeddings()(ids)
        b, s, e = emb.shape
        flat = emb.reshape(b * s, e).clone()
        sel = ids.reshape(-1) == self.cfg.image_context_token_id
        flat[sel] = feats.reshape(-1, e)
        out = self.language_model(inputs_embeds=flat.reshape(b, s, e))
        return out.logits.float().numpy()


def expected_shapes(cfg: C.NVLMConfig):
    return nn.meta.unbox(nvlm_model.abstract_params(cfg))


def state_numpy(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def jax_params_for(torch_model: TorchNVLMD):
    """Our params for a TorchNVLMD, moved by the project's own weight map."""
    cfg = torch_model.cfg
    shapes = expected_shapes(cfg)
    vision = params_from_tensors(
        state_numpy(torch_model.vision_model), cfg, "hf_internvl_vision", shapes, subtree=("vision",)
    )
    llm = params_from_tensors(
        {k: v for k, v in state_numpy(torch_model.language_model).items()}, cfg, "llm", shapes,
        subtree=("llm",),
    )
    projector = params_from_tensors(
        state_numpy(torch_model.projector), cfg, "nvlm", shapes, subtree=("projector",)
    )
    return jax.tree_util.tree_map(np.asarray, {"vision": vision, "llm": llm, "projector": projector})

"""nvlm_jax: NVIDIA's NVLM 1.0 multimodal LLMs (NVLM-D/X/H) in JAX/Flax."""

from nvlm_jax.checkpoint.gptq import quantize_gptq
from nvlm_jax.config import NVLMConfig, param_count
from nvlm_jax.pretrained import NVLMModel, load_pretrained

__version__ = "0.1.0"

__all__ = ["NVLMConfig", "NVLMModel", "load_pretrained", "param_count", "quantize_gptq", "__version__"]

"""nvlm_jax: NVIDIA's NVLM 1.0 multimodal LLMs (NVLM-D/X/H) in JAX/Flax."""

from nvlm_jax.config import NVLMConfig, param_count

__version__ = "0.1.0"

__all__ = ["NVLMConfig", "param_count", "__version__"]

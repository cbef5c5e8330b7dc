"""Host-side preprocessing: image tiling, chat prompts, tokenization (NumPy / Pillow only)."""

from nvlm_jax.processing.chat_template import (
    IMAGE,
    IMAGE_PLACEHOLDER,
    ImageTokenFormat,
    build_prompt,
    expand_image_placeholders,
    image_token_count,
    tile_tags,
)
from nvlm_jax.processing.prompt import (
    CrossAttentionIds,
    EncodedPrompt,
    build_training_example,
    cross_attention_ids,
    encode_prompt,
)
from nvlm_jax.processing.prompt_format import PromptFormat
from nvlm_jax.processing.tiling import (
    ImageLoadError,
    TiledImage,
    load_image,
    normalize_tiles,
    open_image,
    select_grid,
    tile_image,
    tile_images,
)
from nvlm_jax.processing.tokenizer import (
    SpecialTokens,
    get_special_tokens,
    load_tokenizer,
    make_tiny_tokenizer,
)

__all__ = [
    "IMAGE",
    "IMAGE_PLACEHOLDER",
    "CrossAttentionIds",
    "EncodedPrompt",
    "ImageLoadError",
    "ImageTokenFormat",
    "PromptFormat",
    "SpecialTokens",
    "TiledImage",
    "build_prompt",
    "build_training_example",
    "cross_attention_ids",
    "encode_prompt",
    "expand_image_placeholders",
    "get_special_tokens",
    "image_token_count",
    "load_image",
    "load_tokenizer",
    "make_tiny_tokenizer",
    "normalize_tiles",
    "open_image",
    "select_grid",
    "tile_image",
    "tile_images",
    "tile_tags",
]

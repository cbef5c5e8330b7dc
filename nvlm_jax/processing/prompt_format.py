"""How a model's prompts are written: one frozen record saved with every checkpoint.

A model only answers well when it is asked in the format it was trained with: the same tile
tags, tile budget, thumbnail rule, image tokens per tile, system message and chat template.
`PromptFormat` holds exactly those choices. It is written into every converted folder
(`nvlm_config.json`, key "prompt_format") and every training checkpoint (the saved run config),
and it is what the data pipeline, `chat`, `generate`, `eval` and the visualisation read, so
training and inference cannot drift apart. A Hugging Face release folder gets the release's
values (`PromptFormat.release()`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DEFAULT_SYSTEM_MESSAGE = "Answer the questions."
DEFAULT_TOKENS_PER_TILE = 256
TAG_STYLES = ("none", "1d", "2d_grid", "2d_bbox")
TEMPLATES = ("chatml",)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """Attributes:
      tag_style: tile tags: "1d" (the release), "none", "2d_grid", "2d_bbox" (paper Table 1).
      max_tiles: the tile budget of dynamic high resolution (regular tiles per image, 1..n).
        1 resizes every image to a single tile (the paper's stage-1 pretraining).
      use_thumbnail: a multi-tile image also gets a global thumbnail tile.
      tokens_per_tile: image tokens per tile after pixel shuffle (256 for 448-px tiles).
      system_message: the ChatML system turn; None writes no system turn.
      template: the chat template ("chatml", as released).
    """

    tag_style: str = "1d"
    max_tiles: int = 6
    use_thumbnail: bool = True
    tokens_per_tile: int = DEFAULT_TOKENS_PER_TILE
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE
    template: str = "chatml"

    def __post_init__(self):
        _check_type("tag_style", self.tag_style, str)
        _check_type("max_tiles", self.max_tiles, int)
        _check_type("use_thumbnail", self.use_thumbnail, bool)
        _check_type("tokens_per_tile", self.tokens_per_tile, int)
        _check_type("template", self.template, str)
        if self.system_message is not None:
            _check_type("system_message", self.system_message, str)
        if self.tag_style not in TAG_STYLES:
            raise ValueError(f"prompt_format.tag_style must be one of {TAG_STYLES}, got {self.tag_style!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"prompt_format.template must be one of {TEMPLATES}, got {self.template!r}")
        if self.max_tiles < 1:
            raise ValueError(f"prompt_format.max_tiles must be >= 1, got {self.max_tiles}")
        if self.tokens_per_tile < 1:
            raise ValueError(f"prompt_format.tokens_per_tile must be >= 1, got {self.tokens_per_tile}")

    @classmethod
    def release(cls) -> PromptFormat:
        """The format of the released NVLM-D-72B (`max_dynamic_patch` 6, thumbnail, 1-D tags)."""
        return cls()

    @classmethod
    def for_model(cls, cfg: Any, **changes) -> PromptFormat:
        """The format whose tile budget, thumbnail rule and tokens per tile are those of the
        `NVLMConfig` `cfg` (the other fields at their release values unless given)."""
        base = dict(max_tiles=cfg.max_tiles, use_thumbnail=cfg.use_thumbnail, tokens_per_tile=cfg.num_image_tokens)
        return cls(**{**base, **changes})

    def replace(self, **changes) -> PromptFormat:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "prompt_format") -> PromptFormat:
        """Inverse of `to_dict`; unknown keys and wrong types are ValueErrors naming `where`."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown prompt format key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**dict(d))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e


def _check_type(name: str, value: Any, kind: type) -> None:
    # bool is an int subclass: a True max_tiles is a mistake, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"prompt_format.{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")

"""The paper's data blends (NVLM 1.0, Tables 4 and 6) as `{dataset: weight}` presets over your files.

The paper lists the datasets of each blend by category but publishes no mixing weights
(Megatron's example pretraining blend is size-proportional, e.g. LAION 0.579, COCO 0.02,
VQAv2 0.01). Here each category gets a share (our choice, below) split evenly among its
datasets; `blend_weights` flattens that to `{dataset: weight}` (summing to 1). Set your own
with `DataConfig.with_weights` once you know your copies' sizes.

Dataset names are spelled as in the paper's tables (RobuT is split into its three parts).
The data is not downloaded: `blend_data_config(blend, root)` points every dataset at
`{root}/{slug}/{split}.jsonl` (LLaVA-style JSONL, image paths relative to `{root}/{slug}`),
where `slug = dataset_slug(name)` (e.g. "Visual Genome" -> "visual_genome"); `overrides`
points any dataset at another source (a TFDS dataset, ArrayRecord files, another path).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from nvlm_jax.data import sources
from nvlm_jax.data.pipeline import DataConfig

SFT_SYSTEM_MESSAGE = "Follow the user's instruction and answer questions."

# category: (share of the blend, datasets)
Blend = Mapping[str, tuple[float, tuple[str, ...]]]

# Table 4: pretraining (all open-source).
PRETRAIN_BLEND: Blend = {
    "captioning": (0.50, ("COCO", "CC3M", "SBU", "LAION-115M")),
    "vqa_natural_image": (0.15, ("VQAv2", "Visual Genome")),
    "chart": (0.05, ("DVQA",)),
    "document": (0.10, ("Docmatix",)),
    "ocr_scene_text": (
        0.15,
        (
            "OCR-VQA",
            "COCO-Text",
            "TextOCR",
            "ReCTs",
            "RRC-ArT",
            "RRC-LSVT",
            "RCTW",
            "synthdog-en",
            "pdfa-eng-wds",
        ),
    ),
    "math": (0.05, ("CLEVR-Math",)),
}

# Table 6: supervised fine-tuning (text-only SFT blended in).
SFT_BLEND: Blend = {
    "captioning": (0.06, ("COCO", "TextCaps", "ShareGPT-4o")),
    "vqa_natural_image": (0.10, ("VQAv2", "Visual Genome", "TallyQA", "Visual7W", "VizWiz")),
    "general_knowledge": (0.04, ("OK-VQA", "A-OKVQA")),
    "visual_reasoning": (0.06, ("GQA", "Super-CLEVR", "Raven", "VSR")),
    "chart_diagram": (
        0.12,
        (
            "DVQA",
            "PlotQA",
            "MMC-Instruction",
            "ChartQA",
            "InfographicVQA",
            "FigureQA",
            "IconQA",
            "Chart2Text",
            "Diagram Image2Text",
        ),
    ),
    "table": (0.04, ("WikiTableQuestions", "RobuT-WTQ", "RobuT-WikiSQL", "RobuT-SQA", "HiTab")),
    "document": (
        0.12,
        ("DocVQA", "Docmatix", "DUDE", "VisualMRC", "TAT-DQA", "UReader IE", "UReader KG", "UReader QA"),
    ),
    "ocr_scene_text": (
        0.14,
        (
            "OCR-VQA",
            "TextVQA",
            "ST-VQA",
            "ScreenQA",
            "SlideQA",
            "PDF-VQA",
            "VQA-CD",
            "VQAonBD",
            "POIE",
            "SROIE",
            "ORAND",
            "EST-VQA",
            "FUNSD",
            "SQuAD (rendered)",
            "WordArt",
            "IAM",
            "IIIT5K",
            "HME100K",
            "synthdog-en",
            "Bentham QA",
            "HW-SQuAD",
            "WebSight",
            "ChromeWriting",
            "K12 Printing",
            "COCO-Text",
            "TextOCR",
            "ReCTs",
            "pdfa-eng-wds",
        ),
    ),
    "math": (
        0.12,
        (
            "CLEVR-Math",
            "GeoQA+",
            "Geometry3K",
            "TabMWP",
            "GSM8K (rendered)",
            "MetaMathQA (rendered)",
            "MAVIS Data Engine",
            "MAVIS Manual Collection",
            "Geo170K Align",
            "Geo170K QA",
            "GeoMVerse",
            "GEOS",
            "UniGeo",
        ),
    ),
    "science": (0.06, ("AI2D", "ScienceQA", "TQA", "ArXivQA", "textbook data")),
    "visual_instruction_tuning": (0.04, ("LRV-Instruction", "LLaVA-158K", "LLaVAR")),
    "text_only": (
        0.10,
        (
            "SlimOrca",
            "ShareGPT",
            "EvolInstruct",
            "GPTeacher",
            "AlpacaGPT4",
            "UltraInteract",
            "OrcaMathWordProblems",
            "MathInstruct",
            "MetaMath",
            "GlaiveCodeAssistant",
            "Magicoder",
            "WizardCoder",
        ),
    ),
}


def dataset_slug(name: str) -> str:
    """File-system name of a dataset: lowercase, runs of other characters -> "_" ("GeoQA+" -> "geoqa")."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def blend_weights(blend: Blend) -> dict[str, float]:
    """`{dataset: weight}`: each category's share split evenly among its datasets (sums to 1)."""
    total = sum(share for share, _ in blend.values())
    weights: dict[str, float] = {}
    for category, (share, names) in blend.items():
        if share <= 0 or not names:
            raise ValueError(f"blend category {category!r} needs a positive share and datasets")
        for name in names:
            if name in weights:
                raise ValueError(f"dataset {name!r} appears twice in the blend")
            weights[name] = share / total / len(names)
    return weights


def blend_data_config(
    blend: Blend,
    root: str,
    *,
    overrides: Mapping[str, sources.SourceSpec] | None = None,
    **data_config_kwargs: Any,
) -> DataConfig:
    """A `DataConfig` with one source per dataset of `blend`.

    Args:
      blend: `PRETRAIN_BLEND`, `SFT_BLEND` or your own `{category: (share, datasets)}`.
      root: folder holding `{slug}/train.jsonl` (and `{slug}/eval.jsonl`) per dataset; files are
        opened only when a pipeline is built.
      overrides: `{dataset: source spec}` for datasets stored elsewhere or in another format;
        the spec's name and weight are replaced by the dataset's.
      **data_config_kwargs: other `DataConfig` fields (packing, num_workers, prompt_format, ...).
    """
    overrides = dict(overrides or {})
    weights = blend_weights(blend)
    unknown = sorted(set(overrides) - set(weights))
    if unknown:
        raise ValueError(f"overrides name datasets that are not in the blend: {unknown}")
    specs = []
    for name, weight in weights.items():
        if name in overrides:
            specs.append(dataclasses.replace(overrides[name], name=name, weight=weight))
            continue
        folder = os.path.join(root, dataset_slug(name))
        paths = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "eval")}
        specs.append(sources.JsonlSource(name, paths, image_root=folder, weight=weight))
    return DataConfig(sources=tuple(specs), **data_config_kwargs)


def pretrain_data_config(root: str, **kwargs: Any) -> DataConfig:
    """Table 4's pretraining blend over `root` (see `blend_data_config`)."""
    return blend_data_config(PRETRAIN_BLEND, root, **kwargs)


def sft_data_config(root: str, **kwargs: Any) -> DataConfig:
    """Table 6's SFT blend over `root` (see `blend_data_config`). The paper's SFT system message
    (`SFT_SYSTEM_MESSAGE`) is part of the run's prompt format (`prompt_format=...`; the paper's
    SFT run configs set it), so that the checkpoint records the message it was trained with."""
    return blend_data_config(SFT_BLEND, root, **kwargs)

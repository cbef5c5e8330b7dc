"""Tests for nvlm_jax.data.blends: the paper's pretraining and SFT blend presets."""

import os

import pytest

from nvlm_jax import config as config_lib
from nvlm_jax.data import blends, sources
from nvlm_jax.data import pipeline as pl
from nvlm_jax.data.batch import validate_batch
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

# Spot checks against the paper's Tables 4 and 6 (names as printed there).
PRETRAIN_NAMES = {
    "COCO",
    "CC3M",
    "SBU",
    "LAION-115M",
    "VQAv2",
    "Visual Genome",
    "DVQA",
    "Docmatix",
    "OCR-VQA",
    "synthdog-en",
    "pdfa-eng-wds",
    "CLEVR-Math",
}
SFT_NAMES = {
    "ShareGPT-4o",
    "TallyQA",
    "A-OKVQA",
    "Super-CLEVR",
    "ChartQA",
    "InfographicVQA",
    "HiTab",
    "DocVQA",
    "TextVQA",
    "SQuAD (rendered)",
    "GeoQA+",
    "MAVIS Manual Collection",
    "AI2D",
    "LLaVA-158K",
    "SlimOrca",
    "MetaMath",
    "WizardCoder",
}


@pytest.mark.parametrize(
    "blend, names, count",
    [(blends.PRETRAIN_BLEND, PRETRAIN_NAMES, 18), (blends.SFT_BLEND, SFT_NAMES, 97)],
)
def test_blend_weights_are_positive_sum_to_one_and_use_the_papers_names(blend, names, count):
    weights = blends.blend_weights(blend)
    assert len(weights) == count
    assert names <= set(weights)
    assert all(w > 0 for w in weights.values())
    assert abs(sum(weights.values()) - 1.0) < 1e-9
    slugs = [blends.dataset_slug(n) for n in weights]
    assert len(set(slugs)) == len(slugs)  # every dataset gets its own folder


def test_text_only_sft_data_is_part_of_the_sft_blend():
    share, names = blends.SFT_BLEND["text_only"]
    assert share > 0 and {"SlimOrca", "ShareGPT", "UltraInteract", "GlaiveCodeAssistant"} <= set(names)


def test_blend_config_points_every_dataset_at_user_files(tmp_path):
    cfg = blends.pretrain_data_config(str(tmp_path), packing=False)
    by_name = {s.name: s for s in cfg.sources}
    vg = by_name["Visual Genome"]
    assert vg.paths["train"] == os.path.join(str(tmp_path), "visual_genome", "train.jsonl")
    assert not cfg.packing and cfg.weights == blends.blend_weights(blends.PRETRAIN_BLEND)
    sft = blends.sft_data_config(str(tmp_path))
    assert sft.weights == blends.blend_weights(blends.SFT_BLEND) and sft.prompt_format is None


def test_overrides_point_a_dataset_at_tfds_and_unknown_names_are_refused(tmp_path):
    tfds_vqa = sources.TfdsSource("x", "vqav2", data_dir="/tfds")
    cfg = blends.pretrain_data_config(str(tmp_path), overrides={"VQAv2": tfds_vqa})
    spec = next(s for s in cfg.sources if s.name == "VQAv2")
    assert isinstance(spec, sources.TfdsSource) and spec.tfds_name == "vqav2"
    assert spec.weight == blends.blend_weights(blends.PRETRAIN_BLEND)["VQAv2"]
    with pytest.raises(ValueError, match="not in the blend"):
        blends.pretrain_data_config(str(tmp_path), overrides={"ImageNet": tfds_vqa})


@pytest.mark.parametrize("which", ["pretrain", "sft"])
def test_blend_presets_load_and_feed_the_pipeline(tmp_path, which):
    blend = blends.PRETRAIN_BLEND if which == "pretrain" else blends.SFT_BLEND
    for name in blends.blend_weights(blend):
        folder = tmp_path / blends.dataset_slug(name)
        folder.mkdir()
        record = {"conversations": [{"from": "human", "value": f"What is {name}?"}, {"from": "gpt", "value": "data"}]}
        sources.write_jsonl(str(folder / "train.jsonl"), [record])
    tok = load_tokenizer(make_tiny_tokenizer(tmp_path / "tok"))
    model = pl.config_for_tokenizer(config_lib.tiny("D"), tok)
    data = blends.pretrain_data_config(str(tmp_path)) if which == "pretrain" else blends.sft_data_config(str(tmp_path))
    it = pl.make_pipeline(data, model, tok, split="train", seed=0, batch_size=2, seq_len=256, tiles_per_row=4)
    validate_batch(next(it))
    assert it.counts and not it.skip_counts

"""Figures: tiling overlay with tags, per-tile attribution maps (any arch), training curves."""

import json

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from nvlm_jax import config as C
from nvlm_jax import visualize
from nvlm_jax.data.pipeline import config_for_tokenizer
from nvlm_jax.pretrained import NVLMModel
from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer
from nvlm_jax.train.step import param_shapes


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _png(fig, tmp_path, name):
    path = tmp_path / name
    fig.savefig(path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_tiling_overlay_draws_the_grid_tags_and_thumbnail(tmp_path):
    image = Image.new("RGB", (1344, 448), (200, 30, 30))  # 3:1 -> a 3x1 grid + thumbnail
    fig = visualize.plot_tiling(image)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert _texts(fig) == ["<tile_1>", "<tile_2>", "<tile_3>", "<tile_global_thumbnail>"]
    assert "3x1 tiles of 448 px + thumbnail = 4 tiles, 1024 image tokens" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) == 3
    _png(fig, tmp_path, "tiling.png")
    single = visualize.plot_tiling(np.zeros((28, 28, 3), np.uint8), tile_size=28, tokens_per_tile=4)
    assert len(single.axes) == 1 and _texts(single) == ["<tile_global_thumbnail>"]
    grid = visualize.plot_tiling(image, tag_style="2d_grid")
    assert _texts(grid)[:3] == ["<tile_x1_y1>", "<tile_x2_y1>", "<tile_x3_y1>"]


def test_tile_maps_accept_token_weights_and_check_shapes(tmp_path):
    tiles = np.zeros((3, 28, 28, 3), np.uint8)
    weights = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)  # [tiles, tokens] on a 4x4 token grid
    fig = visualize.plot_tile_maps(tiles, weights, ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"], title="w")
    assert len(fig.axes) == 3 and fig.axes[0].images[1].get_array().shape == (4, 4)
    assert fig.axes[2].get_title().endswith(f"{weights[2].sum() / weights.sum():.0%} of total")
    _png(fig, tmp_path, "maps.png")
    with pytest.raises(ValueError, match="square token count, got 15"):
        visualize.plot_tile_maps(tiles, np.ones((3, 15)))
    with pytest.raises(ValueError, match="2 maps for 3 tiles"):
        visualize.plot_tile_maps(tiles, np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="2 tags for 3 tiles"):
        visualize.plot_tile_maps(tiles, np.ones((3, 4, 4)), ["a", "b"])


def test_training_curves_from_a_metrics_file(tmp_path):
    records = [{"step": s, "time": 0.0, "train/loss": 3.0 / s, "train/accuracy": 0.1 * s, "train/lr": 1e-3}
               for s in (1, 2, 3)]
    records.append({"step": 3, "time": 0.0, "eval/exact_match": 0.5, "eval/exact_match/colour": 0.7,
                    "eval/loss": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "tr')
    fig = visualize.plot_training_curves(tmp_path)
    labels = [[line.get_label() for line in ax.lines] for ax in fig.axes]
    assert labels == [["train/loss", "eval/loss"], ["train/accuracy", "eval/exact_match", "eval/exact_match/colour"],
                      ["train/lr"]]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [3.0, 1.5, 1.0])
    _png(fig, tmp_path, "curves.png")
    with pytest.raises(ValueError, match="no records with any of the keys"):
        visualize.plot_training_curves(tmp_path, panels=(("nope",),))
    with pytest.raises(FileNotFoundError, match="metrics file"):
        visualize.plot_training_curves(tmp_path / "missing")


def test_answer_attribution_covers_every_tile_for_cross_attention_models(tmp_path):
    tokenizer = load_tokenizer(make_tiny_tokenizer(tmp_path / "tok"))
    cfg = config_for_tokenizer(C.tiny("X"), tokenizer)
    # Random params straight from the shapes (no init compile); nonzero cross-attention gates, so
    # the regular tiles reach the answer through the cross-attention blocks.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), param_shapes(cfg))
    model = NVLMModel(cfg, params, tokenizer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 56, 3), dtype=np.uint8))
    sal = visualize.answer_saliency(model, image, "What colour is the shape?", answer="red")
    assert sal.maps.shape == (3, 4, 4) and sal.tiles.shape == (3, 28, 28, 3) and sal.tiles.dtype == np.uint8
    assert sal.tags == ("<tile_1>", "<tile_2>", "<tile_global_thumbnail>") and sal.answer == "red"
    assert np.all(sal.maps >= 0) and np.all(sal.maps.reshape(3, -1).sum(1) > 0)
    _png(sal.plot(), tmp_path, "saliency.png")
    with pytest.raises(ValueError, match="answer is empty"):
        visualize.answer_saliency(model, image, "q", answer="")

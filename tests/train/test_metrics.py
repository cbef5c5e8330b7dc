"""Token counts, MFU arithmetic, the peak-FLOP/s probe and the metrics logger's sinks."""

import json

import numpy as np

from nvlm_jax.config import tiny
from nvlm_jax.train import metrics, tensorboard
from tests.train import fakes

CFG = tiny("D")


def test_token_counts_split_text_and_image_tokens():
    batch = fakes.random_batch(CFG, 0, batch_size=2, seq_len=32, tile_slots=2)
    text, image = metrics.batch_token_counts(batch, CFG.image_context_token_id, CFG.num_image_tokens)
    real = int((batch["segment_ids"] > 0).sum())
    assert image == 2 * CFG.num_image_tokens  # one valid tile per row
    assert text == real - image


def test_mfu_is_achieved_over_peak():
    assert metrics.mfu(2e12, 2.0, 2e12) == 0.5
    assert metrics.mfu(1.0, 0.0, 1.0) == 0.0


def test_measured_peak_is_a_plausible_flop_rate():
    peak = metrics.measure_peak_flops(size=256, repeats=2)
    assert 1e8 < peak < 1e16


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    logger = metrics.MetricsLogger(tmp_path, total_steps=10, console=False)
    logger.write(1, {"loss": 2.0, "accuracy": np.float32(0.5)})
    logger.write(1, {"exact_match": 0.25}, prefix="eval")
    logger.write(2, {"loss": float("nan")})
    logger.close()
    records = metrics.read_jsonl(tmp_path / metrics.METRICS_FILE)
    assert records[0]["train/loss"] == 2.0 and records[0]["train/accuracy"] == 0.5
    assert records[1]["eval/exact_match"] == 0.25
    assert records[2]["train/loss"] == "nan"  # JSON has no NaN
    json.dumps(records)
    scalars = tensorboard.read_scalars(tmp_path / metrics.TENSORBOARD_DIR)
    assert scalars["train/loss"][0] == (1, 2.0) and scalars["eval/exact_match"] == [(1, 0.25)]
    assert np.isnan(scalars["train/loss"][1][1])


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "tr')
    assert metrics.read_jsonl(path) == [{"step": 1}]

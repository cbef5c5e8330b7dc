"""int8 / int4 weights on a trained tiny NVLM-D (the main job's model, briefly trained): top-1
agreement with the unquantized model over >= 2,000 teacher-forced positions."""

import importlib.util
import os

import pytest

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")
STEPS = 150


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(CONFIGS, "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.num_steps, c.log_every, c.peak_flops_per_device = STEPS, 50, 1e11
    c.eval.samples_per_task = 0
    c.checkpoint.every, c.checkpoint.async_save = STEPS, False
    c.data.batch_size, c.data.num_workers = 16, 0
    c.mesh.num_devices = 1
    return c


@pytest.mark.slow
def test_quantized_tiny_model_agrees_with_the_float_model(tmp_path):
    from bench.quantize_quality import quality
    from nvlm_jax.train import launch

    launch.train(_tiny_config(), tmp_path, console=False)
    report = quality(tmp_path, samples=32, answers=False, gptq_modes=("int4",), gptq_samples=32)
    assert report["positions"] >= 2000
    assert report["int8"]["top1_agreement"] >= 0.99, report
    assert report["int8"]["logit_err_max"] < 0.05 * report["logit_abs_max"], report
    # Round-to-nearest int4 met the target (>= 95%) on one 1000-step main-job model
    # (97.5%) and not on another (89.6%; BUILD_NOTES); a briefly trained one measured 86-97% over
    # runs, the flips at near-tied logits. GPTQ (calibrated on training examples) meets it.
    assert report["int4"]["top1_agreement"] >= 0.80, report
    assert report["int4_gptq"]["top1_agreement"] >= 0.95, report
    assert report["int4_gptq"]["logit_err_mean"] < report["int4"]["logit_err_mean"], report
    # flips are near-ties: where the float model's top-1 is clear, both agree more often
    assert 0 < report["positions_margin_over_0.5"] < report["positions"], report
    for mode in ("int8", "int4", "int4_gptq"):
        assert report[mode]["top1_agreement_margin_over_0.5"] >= report[mode]["top1_agreement"], report

"""The issue's end to end: a tiny model trained a few steps with 2-D grid tile tags, loaded back
from its workdir, prompts chat and eval exactly as the training pipeline encoded its data."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


def _tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(CONFIGS, "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.num_steps, c.log_every, c.peak_flops_per_device = 2, 1, 1e11
    c.eval.samples_per_task, c.optim.warmup_steps = 0, 1
    c.checkpoint.every, c.checkpoint.async_save = 2, False
    c.data.batch_size, c.data.num_workers, c.data.tag_style = 4, 0, "2d_grid"
    c.model.llm.hidden_size, c.model.llm.intermediate_size, c.model.llm.head_dim = 64, 128, 16
    c.model.vision.hidden_size, c.model.vision.intermediate_size, c.model.vision.num_heads = 32, 64, 2
    c.mesh.num_devices = 1
    return c


@pytest.mark.slow
def test_a_trained_workdir_prompts_like_its_training_data(tmp_path):
    import nvlm_jax
    from nvlm_jax.batch_decode import answer_spans
    from nvlm_jax.data.pipeline import record_batch
    from nvlm_jax.eval import runner
    from nvlm_jax.train import launch

    c = _tiny_config()
    launch.train(c, tmp_path, console=False)
    model = nvlm_jax.load_pretrained(tmp_path, dtype="float32")
    assert model.source.step == 2 and model.prompt_format.tag_style == "2d_grid"

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8))  # 2x1 grid
    record = {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}],
              "images": [image]}
    batch = record_batch(record, model.config, model.tokenizer, seq_len=128, tiles_per_row=4,
                         data_cfg=launch.data_config(c, model.config))
    start, _ = answer_spans(batch)
    want = batch["input_ids"][0][: start[0] + 1]  # the prompt, up to the answer

    inputs = model.prepare_chat(image, "What is it?")
    assert "<tile_x1_y1>" in inputs.prompt.text and inputs.prompt.num_tiles == (3,)
    np.testing.assert_array_equal(inputs.input_ids, want)
    _, prompt = runner.ModelAnswerer(model).prompt("<image>\nWhat is it?", [image])
    np.testing.assert_array_equal(prompt.input_ids, want)

"""experiments/lora_demo.py: LoRA adapters alone teach a briefly trained tiny NVLM-D a question it
was never asked, from JSONL + PNG files, its base weights bit for bit unchanged."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nvlm_jax.train import launch

ROOT = Path(__file__).resolve().parents[2]


@functools.cache  # absl flags may be defined once per process
def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_files_are_llava_jsonl_with_images_under_the_root(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    demo = _module("lora_demo", ROOT / "experiments" / "lora_demo.py")
    path = demo.write_task(str(tmp_path), "eval", 6, seed=0)
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert (tmp_path / r["image"]).is_file()
        assert r["conversations"][0]["value"] == "<image>\n" + demo.QUESTION
        assert r["conversations"][1]["value"] in demo.synthetic.COLOURS


@pytest.mark.slow
def test_lora_alone_learns_the_background_question_and_leaves_the_base_bit_identical(tmp_path):
    # A short main job (colour and shape questions, grey backgrounds) as the model to adapt.
    tiny = _module("tiny_config", ROOT / "experiments" / "configs" / "tiny.py").get_config()
    tiny.num_steps, tiny.eval.samples_per_task, tiny.checkpoint.every = 200, 0, 200
    tiny.data.num_workers = 0
    launch.train(tiny, tmp_path / "main", console=False)

    sys.path.insert(0, str(ROOT / "experiments" / "configs"))
    demo = _module("lora_demo", ROOT / "experiments" / "lora_demo.py")
    summary = demo.run(str(tmp_path / "main"), str(tmp_path / "demo"), steps=120, rank=8, train_size=800,
                       eval_size=100)
    assert summary["held_out_before"]["exact_match"] < 0.6  # asked about the background, it names the shape
    assert summary["held_out"]["exact_match"] >= 0.9
    assert summary["base_bit_identical"]

    # Exported back to the release layout, adapters merged: the same model, read as a HF folder.
    import numpy as np

    import nvlm_jax
    from nvlm_jax.checkpoint import export

    run_dir = tmp_path / "demo" / "run"
    with pytest.raises(ValueError, match="--merge_lora"):
        export.export_checkpoint(run_dir, tmp_path / "hf")
    hf = export.export_checkpoint(run_dir, tmp_path / "hf", merge_lora=True)
    tuned = nvlm_jax.load_pretrained(run_dir, dtype="float32")
    exported = nvlm_jax.load_pretrained(hf, dtype="float32")
    assert tuned.config.lora.rank == 0 and exported.prompt_format == tuned.prompt_format
    image = demo.draw(np.random.default_rng(5))[0]
    inputs = tuned.prepare_chat(image, demo.QUESTION)
    np.testing.assert_allclose(np.asarray(exported.forward(inputs)), np.asarray(tuned.forward(inputs)), atol=2e-5)

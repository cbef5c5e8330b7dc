"""Run configs → model / optimizer / loop settings; paper tables; asking the model a question;
initialising from a converted checkpoint."""

import importlib.util
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from nvlm_jax.sharding import make_mesh
from nvlm_jax.train import evaluate, launch
from nvlm_jax.train.step import param_shapes

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")


def _config_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _config_module("tiny")
PAPER = _config_module("paper")


@pytest.fixture(scope="module")
def tokenizer():
    return launch.load_tokenizer(TINY.get_config())


@pytest.mark.parametrize(
    "arg, batch, lr, warmup, betas, wd, clip, seq_len, tiles, steps",
    [
        ("D,72b,pretrain", 2048, (1e-4, 2.5e-5), 500, (0.9, 0.95), 0.1, 10.0, 512, 1, 20_000),
        ("X,72b,pretrain", 2048, (1e-4, 1e-5), 1000, (0.9, 0.95), 0.05, 1.0, 512, 1, 20_000),
        ("H,34b,pretrain", 2048, (1e-4, 1e-5), 1000, (0.9, 0.98), 0.05, 1.0, 512, 7, 20_000),
        ("D,34b,sft", 128, (2e-6, 2.5e-7), 1000, (0.9, 0.98), 0.1, 10.0, 3200, 7, 40_000),
        ("X,72b,sft", 256, (1e-5, 1e-7), 500, (0.9, 0.98), 0.05, 1.0, 1024, 7, 20_000),
        ("X,34b,sft", 512, (1e-5, 1e-6), 500, (0.9, 0.98), 0.05, 1.0, 1024, 7, 20_000),
        ("H,72b,sft", 256, (1e-5, 1e-7), 1000, (0.9, 0.98), 0.05, 1.0, 1280, 7, 40_000),
    ],
)
def test_paper_configs_carry_tables_10_and_11(arg, batch, lr, warmup, betas, wd, clip, seq_len, tiles, steps):
    c = PAPER.get_config(arg)
    o = launch.optim_config(c)
    assert (c.data.batch_size, (o.lr_max, o.lr_min), o.warmup_steps, (o.b1, o.b2)) == (batch, lr, warmup, betas)
    assert (o.weight_decay, o.clip_norm, c.data.seq_len, c.data.tiles_per_row, c.num_steps) == (
        wd, clip, seq_len, tiles, steps)
    assert o.total_steps == steps and launch.loop_config(c).stage == arg.split(",")[2]


def test_paper_model_configs_are_the_presets(tokenizer):
    cfg = launch.model_config(PAPER.get_config("X,72b,sft"), tokenizer)
    assert (cfg.arch, cfg.llm.num_layers, cfg.xattn_every, cfg.projector.num_layers) == ("X", 80, 8, 1)
    assert (cfg.dtype, cfg.param_dtype, cfg.remat_policy) == ("bfloat16", "float32", "full")
    cfg = launch.model_config(PAPER.get_config("H,34b,pretrain"), tokenizer)
    assert (cfg.arch, cfg.llm.num_layers, cfg.xattn_every, cfg.llm.hidden_size) == ("H", 60, 6, 7168)
    with pytest.raises(ValueError, match="ARCH,SIZE,STAGE"):
        PAPER.get_config("D,13b,sft")


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_tiny_config_arch_is_a_plain_override(arch, tokenizer):
    c = TINY.get_config()
    c.arch = arch  # what --config.arch=... does
    cfg = launch.model_config(c, tokenizer)
    assert cfg.arch == arch and cfg.llm.vocab_size == 1024 and cfg.llm.hidden_size == c.model.llm.hidden_size
    assert cfg.projector.num_layers == (1 if arch == "X" else 2)
    assert TINY.get_config(arch.lower()).arch == arch


def test_question_batch_puts_the_answer_after_the_assistant_turn(tokenizer):
    from nvlm_jax.processing import tokenizer as tok

    c = TINY.get_config()
    cfg = launch.model_config(c, tokenizer)
    image = Image.new("RGB", (28, 28), (200, 30, 30))
    batch = launch.question_batch(c, cfg, tokenizer, image, "What colour is the shape?")
    assert batch["input_ids"].shape == (1, c.data.seq_len) and batch["tile_valid"].sum() == 1
    starts, lengths = evaluate.answer_spans(batch)
    prompt = tok.decode(tokenizer, batch["input_ids"][0, : starts[0] + 1])
    assert prompt.endswith("<|im_start|>assistant\n") and "What colour is the shape?" in prompt
    assert (batch["input_ids"][0] == cfg.image_context_token_id).sum() == cfg.num_image_tokens


def test_ask_answers_greedily_from_the_question_batch(tokenizer):
    from bench.eval_decode import full_forward_batch, full_forward_greedy
    from nvlm_jax.models import nvlm
    from nvlm_jax.processing import tokenizer as tok

    c = TINY.get_config()
    cfg = launch.model_config(c, tokenizer)
    run = launch.Run(c, cfg, tokenizer, None)
    params = nvlm.init_params(cfg, jax.random.key(0))
    image, question = Image.new("RGB", (28, 28), (200, 30, 30)), "What colour is the shape?"
    answer = launch.ask(run, params, image, question, max_new_tokens=6)
    batch = launch.question_batch(c, cfg, tokenizer, image, question)
    starts, _ = evaluate.answer_spans(batch)
    want = np.asarray(full_forward_greedy(params, full_forward_batch(batch, starts, 6), starts, cfg=cfg,
                                           max_new_tokens=6))[0]
    want, _ = evaluate.cut_at_stop(want, [tok.get_special_tokens(tokenizer).im_end])
    assert answer == tok.decode(tokenizer, want.tolist()).strip()


def _paper_run_on_a_tiny_blend(arg, root):
    """The paper recipe `arg` shrunk to the tiny model and tokenizer, reading a blend in which
    every dataset holds one record about the same 3:1 image."""
    from nvlm_jax.data import blends, sources

    blend = blends.PRETRAIN_BLEND if arg.endswith("pretrain") else blends.SFT_BLEND
    for name in blends.blend_weights(blend):
        folder = root / blends.dataset_slug(name)
        folder.mkdir(parents=True)
        Image.new("RGB", (84, 28), (200, 30, 30)).save(folder / "wide.png")  # images live under the dataset
        record = {"image": "wide.png", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                         {"from": "gpt", "value": "a red band"}]}
        sources.write_jsonl(str(folder / "train.jsonl"), [record])
    c = PAPER.get_config(arg)
    c.model.preset, c.model.dtype, c.tokenizer = "tiny", "float32", "tiny"
    c.data.root, c.data.batch_size, c.data.num_workers, c.data.read_threads = str(root), 2, 0, 0
    return c


@pytest.mark.parametrize("arch", ["D", "X"])
def test_paper_stage_1_resizes_every_image_to_one_tile(tmp_path, tokenizer, arch):
    """Table 10: NVLM-D/X pretrain on one tile per image. A 3:1 image (a 3x1 grid under the
    model's 6-tile budget) becomes one tile of the model's tile size, not a too_many_tiles skip."""
    from nvlm_jax.processing import tokenizer as tok

    c = _paper_run_on_a_tiny_blend(f"{arch},72b,pretrain", tmp_path)
    cfg = launch.model_config(c, tokenizer)
    assert cfg.max_tiles == 6 and c.data.tiles_per_row == 1
    fmt = launch.prompt_format(c, cfg)
    assert (fmt.max_tiles, fmt.system_message) == (1, "Answer the questions.")  # saved with the run
    with launch.train_iterator(c, cfg, tokenizer) as it:
        batch = next(it)
    size = cfg.vision.image_size
    assert batch["pixel_values"].shape == (2, 1, size, size, 3) and batch["tile_valid"].all()
    text = tok.decode(tokenizer, batch["input_ids"][0])
    assert "<Image><tile_global_thumbnail>" in text and "<tile_1>" not in text  # a single tile


def test_paper_stage_2_tiles_the_same_image_into_its_grid_and_a_thumbnail(tmp_path, tokenizer):
    from nvlm_jax.processing import tokenizer as tok

    c = _paper_run_on_a_tiny_blend("D,72b,sft", tmp_path)
    cfg = launch.model_config(c, tokenizer)
    fmt = launch.prompt_format(c, cfg)
    assert (fmt.max_tiles, fmt.use_thumbnail, c.data.tiles_per_row) == (6, True, 7)
    assert fmt.system_message == PAPER.SFT_SYSTEM_MESSAGE
    with launch.train_iterator(c, cfg, tokenizer) as it:
        batch = next(it)
    assert batch["pixel_values"].shape[1] == 7 and batch["tile_valid"].sum(axis=1).tolist() == [4, 4]
    text = tok.decode(tokenizer, batch["input_ids"][0])
    assert "<tile_1>" in text and "<tile_3>" in text and "<tile_4>" not in text
    assert "<tile_global_thumbnail>" in text and PAPER.SFT_SYSTEM_MESSAGE in text


def test_init_from_a_converted_checkpoint_folder(tmp_path, tokenizer):
    c = TINY.get_config()
    cfg = launch.model_config(c, tokenizer)
    rng = np.random.default_rng(5)  # random values without compiling an initialiser
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), param_shapes(cfg))
    folder = tmp_path / "converted"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(folder / "params", {k: v for k, v in params.items() if k != "projector"})
    (folder / "nvlm_config.json").write_text(json.dumps({"format": "nvlm_jax.orbax", "config": cfg.to_dict()}))
    c.init.checkpoint = str(folder)
    assert launch.model_config(c, tokenizer) == cfg
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        launch.params_initializer(c, cfg)(mesh)
    c.init.allow_missing = True
    restored = launch.params_initializer(c, cfg)(mesh)
    for key in ("llm", "vision"):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               restored[key], params[key])
    assert set(restored["projector"]) == set(params["projector"])  # freshly initialised
    c.arch = "X"
    with pytest.raises(ValueError, match="is NVLM-D but the run's arch is X"):
        launch.model_config(c, tokenizer)


@pytest.mark.slow
def test_a_converter_output_folder_initialises_the_run():
    from nvlm_jax import convert
    from tests import hf_checkpoint

    folder = hf_checkpoint.tiny_converted()  # HF release layout -> nvlm_jax.convert
    c = TINY.get_config()
    c.init.checkpoint, c.tokenizer = str(folder), ""  # the tokenizer comes from the folder too
    tokenizer = launch.load_tokenizer(c)
    cfg = launch.model_config(c, tokenizer)
    assert cfg.vision.num_dummy_heads == convert.read_our_config(folder).vision.num_dummy_heads
    params = launch.params_initializer(c, cfg)(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    expected = convert.load_our_params(folder, convert.read_our_config(folder))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32)),
                           params, expected)

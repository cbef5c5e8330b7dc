"""`model.chat`: the release's conversation flow, answer decoding, and the chat CLI."""

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nvlm_jax
from nvlm_jax.processing import encode_prompt, get_special_tokens, tile_image
from tests import hf_checkpoint as hc
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return nvlm_jax.load_pretrained(hc.tiny_converted(), dtype="float32")


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


class _Recorder:
    """Stands in for `model.generate`: records its inputs and returns fixed tokens."""

    def __init__(self, tokens):
        self.tokens, self.calls = np.asarray([tokens], np.int32), []

    def __call__(self, input_ids, pixel_values=None, max_new_tokens=32, do_sample=False, **kwargs):
        self.calls.append(dict(input_ids=np.asarray(input_ids), pixel_values=pixel_values,
                               max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs))
        return self.tokens


def _encode(text, model):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_prompt_follows_the_release(model, monkeypatch):
    special = get_special_tokens(model.tokenizer)
    rec = _Recorder(_encode("A red circle.", model) + [special.im_end])
    monkeypatch.setattr(model, "generate", rec)
    image = _image(60, 30)  # wide: a 2x1 grid + thumbnail on 28-px tiles
    answer, history = model.chat(image, "What is this?", return_history=True, max_new_tokens=7)
    assert answer == "A red circle."
    assert history == [("<image>\nWhat is this?", "A red circle.")]
    call = rec.calls[0]
    tiles = tile_image(image, 6, tile_size=28).pixels
    np.testing.assert_array_equal(call["pixel_values"], tiles)
    assert tiles.shape[0] == 3
    want = encode_prompt(model.tokenizer, "<image>\nWhat is this?", [3], tokens_per_tile=4)
    np.testing.assert_array_equal(call["input_ids"][0], want.input_ids)
    assert want.text.startswith("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<Image><tile_1>")
    assert want.text.endswith("</Image>\nWhat is this?<|im_end|><|im_start|>assistant\n")
    assert call["stop_token_ids"] == (special.im_end,) and call["max_new_tokens"] == 7


def test_history_and_several_images(model, monkeypatch):
    rec = _Recorder(_encode("Two shapes.", model))
    monkeypatch.setattr(model, "generate", rec)
    images = [_image(28, 28), _image(60, 30, seed=1)]  # 1 tile and 3 tiles
    answer, history = model.chat(images, "Compare them.", return_history=True)
    assert answer == "Two shapes."
    assert history[0][0] == "<image>\n<image>\nCompare them."
    model.chat(images, "And now?", history)
    second = rec.calls[1]
    want = encode_prompt(model.tokenizer, "And now?", [1, 3], history, tokens_per_tile=4)
    np.testing.assert_array_equal(second["input_ids"][0], want.input_ids)
    assert "<image>" not in want.text and want.text.count("<Image>") == 2
    assert second["pixel_values"].shape[0] == 4


def test_text_only_chat_and_pretiled_pixels(model, monkeypatch):
    rec = _Recorder(_encode("Hello.", model))
    monkeypatch.setattr(model, "generate", rec)
    assert model.chat(None, "Say hello.") == "Hello."
    assert rec.calls[0]["pixel_values"] is None
    want = encode_prompt(model.tokenizer, "Say hello.", [])
    np.testing.assert_array_equal(rec.calls[0]["input_ids"][0], want.input_ids)
    pixels = np.zeros((2, 28, 28, 3), np.float32)
    model.chat(pixels, "<image>\nWhere?")
    assert rec.calls[1]["pixel_values"].shape == (2, 28, 28, 3)


def test_answer_is_cut_at_im_end_and_stripped(model, monkeypatch):
    special = get_special_tokens(model.tokenizer)
    tokens = _encode("  The circle is red. ", model) + [special.im_end] + _encode("junk", model)
    monkeypatch.setattr(model, "generate", _Recorder(tokens))
    assert model.chat(None, "Colour?") == "The circle is red."


def test_real_decoding_stops_at_im_end(model):
    special = get_special_tokens(model.tokenizer)
    forced = copy.copy(model)
    # A large constant in embedding dim 0 keeps that dim of the final hidden state positive;
    # a large weight from it to <|im_end|> makes <|im_end|> the argmax at every step.
    params = dict(model.params, llm=dict(model.params["llm"]))
    embed = np.array(params["llm"]["embed_tokens"])
    embed[:, 0] = 100.0
    head = np.array(params["llm"]["lm_head"]["kernel"])
    head[0, special.im_end] = 100.0
    params["llm"]["embed_tokens"], params["llm"]["lm_head"] = embed, {"kernel": head}
    forced.params = params
    assert forced.chat(_image(28, 28), "Anything?", max_new_tokens=8) == ""
    answer = model.chat(_image(28, 28), "Anything?", max_new_tokens=8)
    assert isinstance(answer, str) and "<|im_end|>" not in answer


def test_chat_without_tokenizer_is_an_error(model):
    bare = nvlm_jax.NVLMModel(model.config, model.params)
    with pytest.raises(ValueError, match="without tokenizer files"):
        bare.chat(None, "hi")


def test_chat_cli_single_question_and_interactive(tmp_path):
    ckpt = hc.tiny_converted()
    _image(60, 30).save(tmp_path / "img.png")
    env = dict(os.environ, JAX_PLATFORMS="cpu", NVLM_JAX_CACHE_DIR=str(tmp_path / "xla"))
    base = [sys.executable, "-m", "nvlm_jax.chat", f"--checkpoint={ckpt}", f"--image={tmp_path / 'img.png'}",
            "--dtype=float32", "--max_new_tokens=4"]
    # absl exits with status 1 after printing --help.
    usage = subprocess.run(base[:3] + ["--help"], cwd=REPO, env=env, capture_output=True, text=True).stdout
    assert "--interactive" in usage and "--question" in usage
    # The second line names a second image the chat does not have: rejected, the session goes on.
    run = subprocess.run(base + ["--interactive", "--question=What is it?"],
                         input="Compare with <image> please.\nAnd the colour?\n\n", cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("assistant> ") == 2 and run.stdout.count("user> ") == 3
    assert run.stderr.count("not added to the conversation") == 1


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer

    return load_tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("arch", ["X", "H"])  # D: test_real_decoding_stops_at_im_end and the CLI test
def test_xh_chat_answers_and_the_image_reaches_the_model(arch, tiny_tokenizer):
    import jax

    from nvlm_jax import config
    from nvlm_jax.data.pipeline import config_for_tokenizer
    from nvlm_jax.models import nvlm

    cfg = config_for_tokenizer(config.tiny(arch), tiny_tokenizer)
    params = nvlm.init_params(cfg, jax.random.key(2))
    # Open the gates of the cross-attention blocks (zero at init: identity).
    params["xattn"] = dict(params["xattn"], attn_gate=np.full_like(params["xattn"]["attn_gate"], 0.5),
                           ffn_gate=np.full_like(params["xattn"]["ffn_gate"], 0.5))
    model = nvlm_jax.NVLMModel(cfg, params, tiny_tokenizer)
    image = _image(60, 30)
    answer, history = model.chat(image, "What is it?", max_new_tokens=3, return_history=True)
    assert isinstance(answer, str) and history == [("<image>\nWhat is it?", answer)]
    inputs = model.prepare_chat(image, "What is it?")
    assert inputs.cross_ids is not None and inputs.pixel_values.shape[0] == 3  # 2 tiles + thumbnail
    n_ctx = int(np.sum(inputs.input_ids == cfg.image_context_token_id))
    assert n_ctx == {"X": 0, "H": 1}[arch] * cfg.num_image_tokens  # H: the thumbnail's tokens
    first = np.asarray(model.forward(inputs))[0, -1]  # the logits of the first answer token
    other = np.asarray(model.forward(model.prepare_chat(_image(60, 30, seed=5), "What is it?")))[0, -1]
    assert np.abs(first - other).max() > 1e-4, "the image must change the logits"


# ---- the prompt format ---------------------------------------------------------------------------


def test_prepare_chat_follows_the_models_prompt_format(tiny_tokenizer):
    from nvlm_jax import config
    from nvlm_jax.data.pipeline import config_for_tokenizer
    from nvlm_jax.processing.prompt_format import PromptFormat

    cfg = config_for_tokenizer(config.tiny("D"), tiny_tokenizer)
    fmt = PromptFormat.for_model(cfg, tag_style="2d_grid", max_tiles=2, system_message="Be brief.")
    model = nvlm_jax.NVLMModel(cfg, None, tiny_tokenizer, prompt_format=fmt)  # prompts only
    inputs = model.prepare_chat(_image(90, 30), "What is it?")  # 3:1 wants 3x1, the budget allows 2x1
    assert inputs.prompt.num_tiles == (3,)  # 2 tiles + thumbnail
    text = inputs.prompt.text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "<tile_x1_y1>" in text
    no_system = model.prepare_chat(_image(90, 30), "What is it?", system_message=None).prompt.text
    assert no_system.startswith("<|im_start|>user\n")
    default = nvlm_jax.NVLMModel(cfg, None, tiny_tokenizer)
    assert default.prompt_format == PromptFormat.for_model(cfg)
    assert "<tile_1>" in default.prepare_chat(_image(90, 30), "What is it?").prompt.text


# ---- the CLI on a training workdir, and its errors ----------------------------------------------------


def _cli(args, cwd, **kwargs):
    env = cpu_env(NVLM_JAX_CACHE_DIR="off")
    return subprocess.run([sys.executable, "-m", "nvlm_jax.chat", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_chat_cli_answers_from_a_training_workdir_in_any_directory(tmp_path):
    from tests.checkpoint.workdir import tiny_model, write_workdir

    cfg, params, _ = tiny_model()
    write_workdir(tmp_path / "run", cfg, params, [(3, None)])
    _image(60, 30).save(tmp_path / "a.png")
    run = _cli([f"--checkpoint={tmp_path / 'run'}", f"--image={tmp_path / 'a.png'}", "--question=What is it?",
                "--max_new_tokens=2", "--dtype=float32"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"loading {tmp_path / 'run'} (training workdir, step 3)..." in run.stderr and "loaded in" in run.stderr
    assert "INFO" not in run.stderr and len(run.stdout.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/no/such/run", "--question=hi"], "/no/such/run: checkpoint path does not exist"),
    (["--checkpoint=.", "--question=hi"], "not a checkpoint: expected a Hugging Face folder"),
    (["--checkpoint={ckpt}", "--image=missing.png", "--question=hi"], "--image missing.png: no such file"),
    (["--checkpoint={ckpt}", "--question=hi", "--max_new_tokens=many"], "flag --max_new_tokens=many"),
    (["--checkpoint={ckpt}"], "give --question (or --interactive)"),
])
def test_chat_cli_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    run = _cli([a.format(ckpt=hc.tiny_converted()) for a in args], cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and message in run.stderr
    assert run.stderr.startswith("nvlm_jax.chat: error: ")


def test_chat_cli_damaged_tokenizer_is_one_line(tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(hc.tiny_converted(), broken)
    (broken / "tokenizer.json").write_text("{not json")
    run = _cli([f"--checkpoint={broken}", "--question=hi"], cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith(("loading ", "loaded "))]
    assert len(lines) == 1 and "tokenizer.json" in lines[0] and lines[0].startswith("nvlm_jax.chat: error: ")

"""The convert CLI: flags, sizes, and a conversion from the command line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from nvlm_jax import convert
from tests import hf_checkpoint as hc
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def release():
    return hc.tiny_release()


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("500MiB") == 500 * 2**20
    assert convert.parse_size("1234") == 1234
    with pytest.raises(ValueError, match="cannot parse size"):
        convert.parse_size("lots")


def test_cli_help_and_conversion(release, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # absl prints the usage and exits with status 1 on --help.
    help_text = subprocess.run([sys.executable, "-m", "nvlm_jax.convert", "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True).stdout
    assert "--hf_dir" in help_text and "--drop_dummy_heads" in help_text
    run = subprocess.run(
        [sys.executable, "-m", "nvlm_jax.convert", f"--hf_dir={release.folder}", f"--out_dir={tmp_path / 'o'}",
         "--dtype=bfloat16", "--noprogress"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert convert.read_our_config(tmp_path / "o").param_dtype == "bfloat16"


def test_parse_mesh():
    assert convert.parse_mesh("1,2,4") == (1, 2, 4)
    assert convert.parse_mesh("2, -1, 1") == (2, -1, 1)
    for bad in ("1,2", "a,b,c", "1,0,8", "1,-2,4"):
        with pytest.raises(ValueError, match="--mesh must be three sizes"):
            convert.parse_mesh(bad)


def _run_cli(args, cwd):
    env = cpu_env()
    return subprocess.run([sys.executable, "-m", "nvlm_jax.convert", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_export_from_a_training_workdir_carries_its_prompt_format(tmp_path):
    import json

    import nvlm_jax
    from nvlm_jax.processing.prompt_format import PromptFormat
    from tests.checkpoint.workdir import params_at, tiny_model, write_workdir

    cfg, params, _ = tiny_model()
    fmt = PromptFormat.for_model(cfg, tag_style="2d_grid", max_tiles=3)
    write_workdir(tmp_path / "run", cfg, params, [(1, None), (2, None)], prompt_format=fmt)
    run = _run_cli([f"--export_from={tmp_path / 'run'}", f"--out_dir={tmp_path / 'hf'}", "--step=1", "--noprogress"],
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["max_dynamic_patch"], hf_config["use_thumbnail"]) == (3, True)
    model = nvlm_jax.load_pretrained(tmp_path / "hf", dtype="float32")
    assert model.prompt_format == fmt and model.tokenizer is not None
    want = params_at(params, 1)["llm"]["embed_tokens"]
    np.testing.assert_array_equal(np.asarray(model.params["llm"]["embed_tokens"]), want)


@pytest.mark.parametrize("args, message", [
    (["--export_from=/no/such/run", "--out_dir=o"], "/no/such/run: checkpoint path does not exist"),
    (["--export_from={ckpt}", "--out_dir=."], "already exists (pass --overwrite to replace it)"),
    (["--hf_dir={ckpt}", "--out_dir=o", "--max_shard_size=lots"], "cannot parse size 'lots'"),
    (["--out_dir=o"], "exactly one of: --hf_dir, --export_from"),
    (["--export_from={ckpt}", "--out_dir=o", "--quantize=int8"], "--quantize applies to --hf_dir imports"),
    (["--hf_dir={ckpt}", "--out_dir=o", "--quantize=int4", "--mesh=1,1,1"], "--quantize streams through one host"),
    (["--gptq_from={ckpt}", "--out_dir=o", "--calibration_task=synthetic_colour"], "--gptq_from needs --quantize"),
    (["--gptq_from={ckpt}", "--out_dir=o", "--quantize=int4"], "needs --quantize=int8|int4 and --calibration_task"),
    (["--gptq_from={ckpt}", "--out_dir=o", "--quantize=int4", "--calibration_task=nosuch"],
     "unknown eval task 'nosuch'"),
    (["--gptq_from={ckpt}", "--out_dir=o", "--quantize=int4", "--calibration_task=synthetic_colour",
      "--calibration_samples=0"], "--calibration_samples must be >= 1"),
])
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    run = _run_cli([a.format(ckpt=hc.tiny_converted()) for a in args], cwd=tmp_path)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_gptq_from_a_training_workdir_writes_a_quantized_folder(tmp_path):
    import nvlm_jax
    from nvlm_jax.processing.prompt_format import PromptFormat
    from tests.checkpoint.workdir import tiny_model, write_workdir

    cfg, params, _ = tiny_model()
    fmt = PromptFormat.for_model(cfg, max_tiles=2)
    write_workdir(tmp_path / "run", cfg, params, [(1, None)], prompt_format=fmt)
    run = _run_cli([f"--gptq_from={tmp_path / 'run'}", f"--out_dir={tmp_path / 'q'}", "--quantize=int4",
                    "--calibration_task=synthetic_colour,synthetic_count", "--calibration_samples=3",
                    "--dtype=float32", "--noprogress"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    model = nvlm_jax.load_pretrained(tmp_path / "q", dtype=None, verify=True)
    assert model.config.quantize == "int4" and model.prompt_format == fmt and model.tokenizer is not None
    assert model.params["llm"]["lm_head"]["kernel_q"].dtype == np.dtype("int4")
    ref = nvlm_jax.load_pretrained(tmp_path / "run", dtype="float32")
    ids = hc.prompt_ids(cfg, [1])[None]
    pixels = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
    want, got = np.asarray(ref.forward(ids, pixels)), np.asarray(model.forward(ids, pixels))
    assert np.abs(got - want).max() < 0.5 * np.abs(want).max()  # random weights: a sanity bound

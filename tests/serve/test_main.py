"""`python -m nvlm_jax.serve`: flag mistakes are one line and exit 2; a real server process
answers the `openai` client and stops on SIGTERM."""

import subprocess
import sys
import time

import openai
import pytest

from tests import hf_checkpoint as hc
from tests.cpu_env import cpu_env
from tests.serve.server import free_port, http


def _env():
    return cpu_env(NVLM_JAX_CACHE_DIR="off")


@pytest.mark.parametrize("args, message", [
    (["--checkpoint=/no/such/run"], "/no/such/run: checkpoint path does not exist"),
    (["--checkpoint={ckpt}", "--max_batch=0"], "--max_batch must be >= 1, got 0"),
    (["--checkpoint={ckpt}", "--image_root=/no/such/folder"], "--image_root /no/such/folder: no such folder"),
])
def test_flag_mistakes_are_one_line_and_exit_2(args, message, tmp_path):
    args = [a.format(ckpt=hc.tiny_converted()) for a in args]
    run = subprocess.run([sys.executable, "-m", "nvlm_jax.serve", *args], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.slow
def test_the_server_process_answers_the_openai_client(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nvlm_jax.serve", f"--checkpoint={hc.tiny_converted()}", f"--port={port}",
         "--dtype=float32", "--max_model_len=256", "--max_batch=2", "--quantize=int8"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if http(f"{base}/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.25)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="nvlm", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=4, temperature=0)
        assert out.usage.completion_tokens <= 4 and out.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "serving 'nvlm' on http://127.0.0.1:" in proc.stderr.read()

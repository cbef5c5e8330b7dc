"""kill -9 of a trainer leaves nothing running: its grain workers (and through them
multiprocessing's resource tracker) exit when the process that built the pipeline dies."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])

    def main():
        from nvlm_jax import config as config_lib
        from nvlm_jax.data import pipeline as pl
        from nvlm_jax.processing import load_tokenizer, make_tiny_tokenizer
        tok = load_tokenizer(make_tiny_tokenizer(sys.argv[2]))
        cfg = pl.config_for_tokenizer(config_lib.tiny("D"), tok)
        data = pl.synthetic_data_config({"colour": 1.0}, num_workers=1)
        it = pl.make_pipeline(data, cfg, tok, split="train", seed=0, batch_size=2, seq_len=64, tiles_per_row=2)
        next(it)
        print("READY", flush=True)
        time.sleep(300)

    if __name__ == "__main__":
        main()
""")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux procfs to find the workers")
def test_grain_workers_and_resource_tracker_exit_when_the_trainer_is_killed(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(tmp_path / "tok")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    kids: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "READY"
        kids = _children(proc.pid)
        assert len(kids) >= 2  # the worker and the resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_running(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [k for k in kids if _running(k)]
        assert not left, f"processes {left} outlived their killed parent"
    finally:
        proc.kill()
        for k in kids:
            if _running(k):
                os.kill(k, signal.SIGKILL)  # leave nothing behind even when the test fails

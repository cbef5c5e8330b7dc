"""Multi-host training on one machine: `experiments/train.py` in 2 processes x 4 CPU devices
(gloo collectives over localhost) trains the tiny model, checkpoints, and a fresh 2-process
launch resumes it; losses, held-out metrics and final params match a single-process 8-device
run of the same config. Also: the per-process pieces (data shards, row layout) on their own."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from nvlm_jax.data import pipeline
from nvlm_jax.train import checkpoint, launch, metrics, multihost
from tests.cpu_env import cpu_env
from tests.train.test_launch import TINY

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "experiments" / "train.py"
STEPS = 4
# A small model on a (data 2, fsdp 2, tensor 2) mesh, so every kind of sharding spans both
# processes' devices; 2 fixed data shards, so 1 and 2 processes read the same global batches.
OVERRIDES = [
    f"--config={ROOT / 'experiments' / 'configs' / 'tiny.py'}", "--config.log_every=1",
    "--config.optim.warmup_steps=2", f"--config.optim.total_steps={STEPS}", "--config.checkpoint.every=2",
    "--config.checkpoint.keep=3", "--config.eval.every=2", "--config.eval.samples_per_task=4",
    "--config.eval.batch_size=8", "--config.eval.tasks=('colour',)",
    "--config.data.batch_size=8", "--config.data.num_shards=2", "--config.data.num_workers=0",
    "--config.model.llm.hidden_size=64", "--config.model.llm.intermediate_size=128", "--config.model.llm.head_dim=16",
    "--config.model.llm.num_layers=1", "--config.model.vision.hidden_size=32",
    "--config.model.vision.intermediate_size=64", "--config.model.vision.num_heads=2",
    "--config.model.vision.num_layers=1", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
    "--config.peak_flops_per_device=1e11", "--quiet",
]
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
    return cpu_env(devices, drop=tuple(k for k in os.environ if k.startswith("JAX_")), **extra)


def _launch(argvs: list[list[str]], envs: list[dict], logs: list[Path], what: str) -> list[str]:
    """Runs one process per argv to completion; returns their outputs. A failure or timeout
    kills them all and fails the test showing every process's output."""
    procs = []
    for argv, env, log in zip(argvs, envs, logs, strict=True):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                time.sleep(2 if failed else 0)  # let the others print their side of a failure
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    if any(p.returncode != 0 for p in procs):
        shown = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{out[-4000:]}"
                          for i, (p, out) in enumerate(zip(procs, outputs, strict=True)))
        pytest.fail(f"{what} failed or timed out:\n{shown}")
    return outputs


def _run(workdir: Path, num_steps: int, processes: int, cache: Path, *, by_env: bool = False) -> list[str]:
    """Runs the launcher to step `num_steps` in `processes` processes of 8 / processes devices,
    telling them the coordinator by flags or (`by_env`) by environment variables."""
    port = _free_port()
    cmd = [sys.executable, str(TRAIN), f"--workdir={workdir}", *OVERRIDES, f"--config.num_steps={num_steps}",
           f"--config.compilation_cache_dir={cache}"]
    argvs, envs = [], []
    for i in range(processes):
        argv, extra = list(cmd), {}
        if processes > 1 and by_env:
            extra = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                         JAX_PROCESS_ID=str(i))
        elif processes > 1:
            argv += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        argvs.append(argv)
        envs.append(_env(8 // processes, **extra))
    logs = [workdir.parent / f"{workdir.name}.{num_steps}.p{i}.log" for i in range(processes)]
    return _launch(argvs, envs, logs, f"{processes}-process run to step {num_steps}")


def _records(workdir: Path, prefix: str) -> dict[int, dict]:
    out = {}
    for r in metrics.read_jsonl(workdir / metrics.METRICS_FILE):
        values = {k: v for k, v in r.items() if k.startswith(prefix)}
        if values:
            out.setdefault(r["step"], []).append(values)
    return out


def _final_params(workdir: Path) -> dict:
    """The params of the step-`STEPS` checkpoint, restored on one device."""
    import orbax.checkpoint as ocp

    folder = workdir / "checkpoints" / str(STEPS) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(folder)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                    {"params": tree["params"]})
    restored, missing = checkpoint.restore_params(folder, target)
    assert not missing
    return jax.tree_util.tree_map(np.asarray, restored["params"])


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_like_one_process(tmp_path):
    cache = tmp_path / "xla_cache"  # the resumed launch reuses the first one's compiled programs
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run(single, STEPS, 1, cache)
    first = _run(multi, 2, 2, cache)  # steps 1-2, a checkpoint at 2
    data = multi / "checkpoints" / "2" / "data"
    shard_files = sorted(p.name for p in data.glob("shard_*"))
    assert shard_files == ["shard_0-of-2.json", "shard_1-of-2.json"]
    for name in shard_files:  # process 0 cannot know shard 1's state: each process wrote its own
        assert checkpoint.decode_iterator_state(json.loads((data / name).read_text()))["batches"] == 2
    assert "finished step 2" in first[0] and "finished step" not in first[1]  # console: process 0 only
    second = _run(multi, STEPS, 2, cache, by_env=True)  # a fresh launch: resumes at 2, trains 3-4
    assert all(f"resumed from {multi / 'checkpoints' / '2'}" in out for out in second)

    expected, got = _records(single, "train/"), _records(multi, "train/")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in got.values()), "metrics must be written by process 0 only"
    assert len(list((multi / metrics.TENSORBOARD_DIR).iterdir())) == 2  # one event file per launch
    # Gradients are summed in another order when the all-reduce crosses processes (gloo) than
    # within one: equal up to float32 rounding, not bitwise.
    for step in expected:
        e, g = expected[step][0], got[step][0]
        for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/lr", "train/loss_tokens"):
            assert g[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), (step, key)
        # Throughput counts the tokens of the global batch, not of one process's rows.
        if "train/text_tokens_per_s" in g:
            assert g["train/text_tokens_per_s"] * g["train/step_time_s"] == pytest.approx(
                e["train/text_tokens_per_s"] * e["train/step_time_s"], rel=1e-6)
    expected_eval, got_eval = _records(single, "eval/"), _records(multi, "eval/")
    assert sorted(got_eval) == sorted(expected_eval) == [2, STEPS]
    for step in expected_eval:
        e, g = expected_eval[step][0], got_eval[step][0]
        assert g["eval/exact_match"] == e["eval/exact_match"] and g["eval/loss"] == pytest.approx(e["eval/loss"],
                                                                                                rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           _final_params(multi), _final_params(single))


HELPERS = """
import sys
from nvlm_jax import distributed
distributed.initialize(distributed.from_settings(coordinator_address=sys.argv[2], num_processes=2,
                                                 process_id=int(sys.argv[1])))
import jax, jax.numpy as jnp, numpy as np
from nvlm_jax.sharding import make_mesh
from nvlm_jax.train import metrics, multihost
p = jax.process_index()
rows = jax.sharding.NamedSharding(make_mesh(1, -1, 1), jax.sharding.PartitionSpec(("data", "fsdp")))
x = jax.make_array_from_process_local_data(rows, np.arange(4, dtype=np.float32) + 4 * p)  # [8] over 8 devices
assert multihost.check_row_layout(rows, 4) == 8
assert {q: r.tolist() for q, r in multihost.process_rows(rows, 8).items()} == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
np.testing.assert_array_equal(multihost.to_host(multihost.synced_call(jax.jit(lambda a: 2 * a), x)),
                              2 * np.arange(8))
np.testing.assert_array_equal(multihost.sum_over_processes(np.array([p + 1, 10])), [3, 20])
with jax.set_mesh(make_mesh(1, -1, 1)):  # as in the training loop: a global mesh is current
    peak = metrics.measure_peak_flops(size=128, repeats=2)  # a timing: differs between processes
print("peak", multihost.from_primary(peak), "own", peak)
multihost.barrier("done")
"""


def test_multihost_helpers_across_two_processes(tmp_path):
    port = _free_port()
    argvs = [[sys.executable, "-c", HELPERS, str(i), f"127.0.0.1:{port}"] for i in range(2)]
    envs = [_env(4, PYTHONPATH=str(ROOT))] * 2
    outputs = _launch(argvs, envs, [tmp_path / f"p{i}.log" for i in range(2)], "multihost helpers")
    agreed = [next(line.split()[1] for line in out.splitlines() if line.startswith("peak ")) for out in outputs]
    assert agreed[0] == agreed[1]  # process 0's measurement on both


# ---- the pieces, in one process ------------------------------------------------------------------


def test_process_shards_split_the_data_shards_evenly():
    assert [list(multihost.process_shards(4, p, 2)) for p in range(2)] == [[0, 1], [2, 3]]
    assert list(multihost.process_shards(0, 1, 2)) == [1]  # 0: one shard per process
    with pytest.raises(ValueError, match="num_shards 3 must be a positive multiple of the process count 2"):
        multihost.process_shards(3, 0, 2)


def test_a_process_reading_two_shards_feeds_both_in_order():
    c = TINY.get_config()
    c.data.batch_size, c.data.num_workers, c.data.num_shards = 4, 0, 2
    tokenizer = launch.load_tokenizer(c)
    cfg = launch.model_config(c, tokenizer)
    it = launch.train_iterator(c, cfg, tokenizer)
    assert isinstance(it, pipeline.ShardedIterator) and (it.num_shards, it.shard_indices) == (2, (0, 1))
    halves = [pipeline.make_pipeline(launch.data_config(c, cfg), cfg, tokenizer, split="train", seed=c.data.seed,
                                     batch_size=4, seq_len=c.data.seq_len, tiles_per_row=c.data.tiles_per_row,
                                     shard_index=i, shard_count=2) for i in range(2)]
    with it, halves[0], halves[1]:
        next(it)
        state = it.get_state()
        batch = next(it)
        for h in halves:
            next(h)
        parts = [next(h) for h in halves]
        for key, value in batch.items():
            np.testing.assert_array_equal(value, np.concatenate([p[key] for p in parts]), err_msg=key)
        it.set_state(state)
        np.testing.assert_array_equal(next(it)["input_ids"], batch["input_ids"])
        with pytest.raises(ValueError, match=r"no iterator state for data shard\(s\) \[1\]"):
            it.set_state({0: state[0]})


@dataclasses.dataclass(frozen=True)
class _Device:
    id: int
    process_index: int


class _Sharding:
    """Rows split in `blocks` equal blocks over `owners` (the process of each block's device)."""

    def __init__(self, owners):
        self.owners = owners

    def devices_indices_map(self, shape):
        n = shape[0] // len(self.owners)
        return {_Device(i, p): (slice(i * n, (i + 1) * n),) for i, p in enumerate(self.owners)}


def test_row_layout_is_checked_against_the_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    interleaved = _Sharding([0, 1, 0, 1])  # e.g. a TPU device order: still one disjoint half each
    assert {p: list(r) for p, r in multihost.process_rows(interleaved, 8).items()} == {0: [0, 1, 4, 5],
                                                                                      1: [2, 3, 6, 7]}
    assert multihost.check_row_layout(interleaved, 4) == 8
    with pytest.raises(ValueError, match=r"holds devices of processes \[0\] only"):
        multihost.check_row_layout(_Sharding([0, 0]), 2)
    with pytest.raises(ValueError, match="must be split across processes"):
        multihost.check_row_layout(_Sharding([0, 0, 0, 1]), 2)

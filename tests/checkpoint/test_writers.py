"""Sharded conversion (2 processes x 4 CPU devices, each reading and writing only its shards) and
restoring the result onto other meshes, on a scaled-down NVLM-D-72B that keeps the head
structure that constrains a 72B mesh: 64 query / 8 KV heads and a 25-head ViT padded to 32 with
7 zero dummy heads."""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import nvlm_jax
from nvlm_jax import config as C
from nvlm_jax.checkpoint import assemble as assemble_lib
from nvlm_jax.checkpoint import hf_import, manifest, restore, writers
from nvlm_jax.sharding import make_mesh
from tests import hf_checkpoint as hc
from tests import torch_reference as ref
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIXELS = np.random.default_rng(2).standard_normal((4, 28, 28, 3)).astype(np.float32)
PROCESSES, DEVICES_PER_PROCESS = 2, 4
SAVE_MESH = "1,2,4"  # data, fsdp, tensor: every param's blocks differ from both restore meshes below
TIMEOUT_S = 300
STATS = re.compile(r"process (\d+) of (\d+): read (\d+) source bytes \(its share (\d+), whole checkpoint (\d+)\)")


def scaled_72b_cfg() -> C.NVLMConfig:
    """`nvlm_d_72b()` with tiny widths, 2 layers and the tiny tokenizer's vocab, same head counts.

    ViT: 25 heads of 4 (the dummy heads are added by the checkpoint writer, as in the release);
    LLM: 64 query heads of 4 over 8 KV heads. Every width divides 8 ways where its axis shards.
    """
    base = C.nvlm_d_72b()
    vision = dataclasses.replace(base.vision, hidden_size=100, num_layers=2, num_dummy_heads=0, intermediate_size=64,
                                 image_size=28, patch_size=7)
    llm = dataclasses.replace(base.llm, vocab_size=hc.TINY_VOCAB, hidden_size=256, num_layers=2, head_dim=4,
                              intermediate_size=64, max_position_embeddings=4096)
    assert (llm.num_heads, llm.num_kv_heads, vision.num_heads) == (64, 8, 25)
    return base.replace(vision=vision, llm=llm, projector=C._projector_for(vision, llm, "D"),
                        image_context_token_id=hc.tiny_special_ids()["vision_pad"])


@pytest.fixture(scope="module")
def release72(tmp_path_factory):
    cfg = scaled_72b_cfg()
    # Weights are not rounded to bf16: the f32-stored tensors exercise the cast of every block.
    model = ref.TorchNVLMD(cfg, seed=11)
    folder = hc.write_release(tmp_path_factory.mktemp("hf72") / "hf", model,
                              dummy_heads=C.NVLM_VIT_DUMMY_HEADS, num_shards=3)
    return folder


@pytest.fixture(scope="module")
def single(release72, tmp_path_factory):
    """The default (one-process, streamed) conversion: the reference."""
    return hf_import.convert(release72, tmp_path_factory.mktemp("single") / "ckpt", dtype="bfloat16", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], logdir, timeout_s: int = TIMEOUT_S) -> list[tuple[int, str, str]]:
    """Runs `python -m nvlm_jax.convert ARGS` as PROCESSES processes of one JAX job (gloo, a free
    localhost port); returns (returncode, stdout, stderr) per process. Processes still running
    after `timeout_s` are killed and the test fails showing what they printed."""
    port = _free_port()
    procs = []
    for i in range(PROCESSES):
        env = cpu_env(DEVICES_PER_PROCESS, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(i))
        out, err = open(logdir / f"p{i}.out", "w+"), open(logdir / f"p{i}.err", "w+")
        procs.append((subprocess.Popen([sys.executable, "-m", "nvlm_jax.convert", *args], cwd=REPO, env=env,
                                       stdout=out, stderr=err, start_new_session=True), out, err))
    deadline = time.monotonic() + timeout_s
    timed_out = False
    for p, _, _ in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    results = []
    for p, out, err in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and nothing else
            p.wait()
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    if timed_out:
        pytest.fail(f"conversion processes ran past {timeout_s} s:\n" + _show(results))
    return results


def _show(results) -> str:
    return "\n".join(f"--- process {i} (rc {rc}) stdout:\n{out[-3000:]}\n--- stderr:\n{err[-6000:]}"
                     for i, (rc, out, err) in enumerate(results))


@pytest.fixture(scope="module")
def sharded(release72, tmp_path_factory):
    """The release converted by 2 processes x 4 devices on the SAVE_MESH; (folder, per-process stats)."""
    work = tmp_path_factory.mktemp("sharded")
    out = work / "ckpt"
    results = run_processes([f"--hf_dir={release72}", f"--out_dir={out}", f"--mesh={SAVE_MESH}", "--dtype=bfloat16",
                             "--noprogress"], work)
    if any(rc != 0 for rc, _, _ in results):
        pytest.fail("sharded conversion failed:\n" + _show(results))
    stats = {}
    for _, stdout, _ in results:
        m = STATS.search(stdout)
        assert m, stdout
        stats[int(m.group(1))] = dict(zip(("processes", "read", "share", "total"), map(int, m.groups()[1:]),
                                          strict=True))
    return out, stats


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in kp): v
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_each_process_reads_and_writes_only_its_share(sharded):
    out, stats = sharded
    assert sorted(stats) == [0, 1] and all(s["processes"] == 2 for s in stats.values())
    total = stats[0]["total"]
    for s in stats.values():
        # Bytes counted at the preads equal the blocks its devices hold (computed from the shardings):
        # no process reads a whole tensor it only holds part of.
        assert s["read"] == s["share"], s
        assert 0.4 * total < s["read"] < 0.6 * total, s  # half the sharded bytes + the small replicated ones
    assert stats[0]["read"] + stats[1]["read"] >= total
    # Each process wrote its own shards (Orbax OCDBT keeps one data folder per writing process).
    for i in range(PROCESSES):
        written = [p for p in (out / "params" / f"ocdbt.process_{i}").rglob("*") if p.is_file()]
        assert written and sum(p.stat().st_size for p in written) > 0.2 * total, i
    assert sorted(p.name for p in out.iterdir()) == ["nvlm_config.json", "nvlm_manifest.json", "params",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert manifest.verify_manifest(out) > 4  # process 0 hashed every process's files after the barrier
    assert not list(out.parent.glob(".ckpt.tmp-*"))  # staging renamed away


@pytest.mark.slow
def test_restores_onto_other_meshes_equal_to_the_one_process_conversion(sharded, single):
    out, _ = sharded
    cfg = restore.read_our_config(out)
    assert cfg == restore.read_our_config(single)
    assert cfg.vision.total_heads == 32 and cfg.llm.num_kv_heads == 8 and cfg.param_dtype == "bfloat16"
    want = _flat(restore.load_our_params(single, cfg))
    for sizes in [(2, 4, 1), (1, 1, 8)]:
        mesh = make_mesh(*sizes)
        if sizes == (2, 4, 1):
            params = nvlm_jax.load_pretrained(out, dtype="bfloat16", mesh=mesh, layer_layout="stacked").params
        else:
            params = restore.load_our_params(out, cfg, mesh=mesh)
        got = _flat(params)
        assert sorted(got) == sorted(want)
        for name, w in want.items():
            assert got[name].sharding.mesh.shape == mesh.shape, name
            assert got[name].dtype == w.dtype and np.asarray(got[name]).tobytes() == np.asarray(w).tobytes(), name
        qkv = got["vision/layers/attn/qkv/kernel"]  # [layers, C, 3, 32 heads, d]
        assert qkv.shape == (2, 100, 3, 32, 4)
        blocks = {writers._bounds(s.index, qkv.shape) for s in qkv.addressable_shards}
        assert len(blocks) == {(2, 4, 1): 4, (1, 1, 8): 8}[sizes]  # fsdp 4 on C; tensor 8 on heads


@pytest.mark.slow
def test_forward_logits_match_across_meshes(sharded, single, release72):
    out, _ = sharded
    reference = nvlm_jax.load_pretrained(single, dtype="float32")
    ids = hc.prompt_ids(reference.config, [3, 1])[None]  # two images: 3 tiles and 1 tile
    want = np.asarray(reference.forward(ids, PIXELS))
    for sizes in [(2, 4, 1), (1, 1, 8)]:
        model = nvlm_jax.load_pretrained(out, dtype="float32", mesh=make_mesh(*sizes))
        got = np.asarray(model.forward(ids, PIXELS))
        assert got.shape == want.shape == (1, ids.shape[1], hc.TINY_VOCAB)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=str(sizes))


@pytest.mark.slow
def test_a_mesh_the_heads_cannot_split_fails_in_every_process_before_writing(release72, tmp_path):
    # Without its 7 dummy heads the ViT has 25 heads, which a tensor axis of 4 cannot split.
    out = tmp_path / "bad"
    results = run_processes([f"--hf_dir={release72}", f"--out_dir={out}", f"--mesh={SAVE_MESH}",
                             "--drop_dummy_heads", "--noprogress"], tmp_path)
    for rc, _, err in results:
        assert rc != 0 and "the ViT has 25 heads + 0 dummy = 25: a tensor axis of 4 cannot split them" in err, \
            _show(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0.err", "p0.out", "p1.err", "p1.out"]


def test_tensor_axis_not_dividing_kv_heads_is_refused_before_writing(release72, tmp_path):
    mesh = make_mesh(1, 2, 3, devices=jax.devices()[:6])
    with pytest.raises(ValueError, match="the LLM has 8 KV heads: a tensor axis of 3 cannot split them"):
        hf_import.convert(release72, tmp_path / "bad", mesh=mesh, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_one_process_sharded_conversion_equals_the_streamed_one(tmp_path):
    """In-process (8 devices) checks of the block reader: dropped dummy heads, and the padded
    heads and freshly initialised params of `assemble`."""
    release = hc.tiny_release()  # 2 real + 2 dummy ViT heads, 2 KV heads
    mesh = make_mesh(2, 2, 2)
    streamed = hf_import.convert(release.folder, tmp_path / "a", drop_dummy_heads=True, progress=False)
    out, stats = hf_import.convert_sharded(release.folder, tmp_path / "b", mesh, drop_dummy_heads=True, progress=False)
    assert stats.bytes_read < stats.share_bytes  # the dropped (zero) heads are never read
    cases = [(streamed, out)]
    model = release.torch_model
    vit = hc.write_standalone(tmp_path / "vit", hc.standalone_vit_state(model), hc.standalone_vit_config(release.cfg))
    llm_dir = tmp_path / "llm"
    model.language_model.save_pretrained(llm_dir, safe_serialization=True)
    kwargs = dict(dtype="bfloat16", seed=1, vit_dummy_heads=2, image_context_token_id=5, progress=False)
    cases.append((assemble_lib.assemble(vit, llm_dir, tmp_path / "c", **kwargs),
                  assemble_lib.assemble(vit, llm_dir, tmp_path / "d", mesh=mesh, **kwargs)))
    for a, b in cases:
        cfg = restore.read_our_config(a)
        assert restore.read_our_config(b) == cfg
        want = _flat(restore.load_our_params(a, cfg))
        got = _flat(restore.load_our_params(b, cfg, mesh=make_mesh(1, 8, 1)))
        for name, w in want.items():
            assert np.asarray(got[name]).tobytes() == np.asarray(w).tobytes(), name

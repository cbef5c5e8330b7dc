"""bench/run_all.py: parsing each bench's printed table, merging results, regenerating BUILD_NOTES."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", os.path.join(REPO, "bench", "run_all.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run_all"] = module
    spec.loader.exec_module(module)
    return module


FORWARD = """\
NVLM-D prefill, 104.9M params, 3840 tokens (14 tiles of 448 px); x86_64, 2 cores, torch threads 2, 2026-11-27
float32   jax   1.234 s   torch   2.468 s   jax/torch time 0.50x
bfloat16  jax   3.000 s   torch   1.500 s   jax/torch time 2.00x
"""
DECODE = """\
model: Qwen2-style LLM, 45.1M params, float32; prompt 64 tokens, 64 new tokens, greedy; jax 0.10.2 (cpu), torch 2.13.0
batch 1: nvlm_jax    150.0 tok/s (0.43 s) | transformers     50.0 tok/s (1.28 s) | speed-up 3.00x | same tokens 100.0%
batch 8: nvlm_jax    800.0 tok/s (0.64 s) | transformers    400.0 tok/s (1.28 s) | speed-up 2.00x | same tokens 98.4%
"""
PREPROCESS = """\
# preprocess bench: 24 images, 101 tiles of 448x448, tokenizer: release
seconds per pass           ours  baseline   ratio
decode                    0.100     0.100   1.00x
total (end to end)        0.500     1.500   3.00x
images/s                   48.0      16.0
tile_images on 2 threads: 80.0 images/s, 5.00x the single-threaded baseline (median of per-repeat ratios; \
range 4.10-5.90x; ratio of medians 5.10x)
"""
DATA = """\
data pipeline, NVLM-D, 448-px tiles (6+1 per sample), tiny tokenizer, batch 4 x 4096 tokens x 14 tiles, ...
workers  samples/s   tokens/s  batches/s  tiles/sample  samples/row  token fill  main CPU ms/sample
      0       10.0      18000       1.25          7.00         2.00        0.90               95.0
      2       15.0      27000       1.88          7.00         2.00        0.90               10.0
"""
CONVERT = """\
free disk at /tmp/x: 70.0 GB
synthetic checkpoint: 4.30 GB in 5 shards, largest tensor 1.25 GB (written in 20 s, evicted from the page cache)
convert: 21.5 s, 0.20 GB/s of source data, output 2.10 GB (Orbax, zstd)
peak RSS (VmHWM): 1.50 GB; target 1.5 x largest tensor + 1 GB = 2.87 GB -> OK
"""
ARCH = """\
2026-11-27, 2-core CPU, batch 2, f32, ViT frozen
arch | decoder tokens | s/sample | samples/s | relative to D | paper length | paper relative to D
X | 296 | 0.500 | 2.00 | 1.80x | 1024 | 1.76x
H | 360 | 0.700 | 1.43 | 1.29x | 1280 | 1.26x
D | 744 | 0.900 | 1.11 | 1.00x | 2816 | 1.00x
"""
MEMORY = """\
2026-11-27, CPU AOT compile on 128 simulated devices; GiB per device
arch | mesh | devices | layout | batch x seq | args | temp | total (XLA) | analytic params+state | ...
D | infer8 | 8 | data=1 fsdp=1 tensor=8 | 1x3200 | 18.5 | 2.0 | 20.5 | 18.4 | 30 | yes | yes
D | train64 | 64 | data=1 fsdp=8 tensor=8 | 8x3200 | 20.0 | 70.0 | 90.0 | 20.1 | 120 | no | yes
"""
ATTENTION = """\
jax 0.10.2, gpu: NVIDIA H100; pallas compiled; median of 10

vit 7x1025 bidirectional: b=7 s=1025 t=1025 heads=25/25 d=128 bfloat16; blocks 128x128, 0.0% of blocks skipped
  implementation      fwd ms  fwd+bwd ms
  pallas                2.00        6.00
  xla                   4.00       12.00
  jax.nn[cudnn]         1.50  n/a (ValueError: unsupported)

decoder 3200 causal packed: b=1 s=3200 t=3200 heads=64/8 d=128 bfloat16; blocks 128x128, 60.0% of blocks skipped
  implementation      fwd ms  fwd+bwd ms
  pallas                1.00        3.00
  xla                   0.50        3.00
"""
TRAIN = """\
date 2026-11-27  x86_64  cpus 2  jax 0.10.2  backend cpu
model: 104.5M params (94.3M trained, stage sft), dtype bfloat16 (f32 master weights), remat none
batch: 4 x 1024 tokens, 1 tile(s) of 448 px per row; final loss 9.100
compile 30.1 s; step median 2500 ms (min 2400, max 2600) over 5 steps
step FLOPs 2.600 TFLOP (vision 0.100 fwd, decoder+head 0.700 fwd) -> 1040.0 GFLOP/s
peak (bf16 x bf16 -> f32 4096^3 matmul, before/after the steps) 1500.0 / 2000.0 GFLOP/s -> 2000.0
MFU 52.0%
"""


def test_each_bench_table_parses_into_figures(run_all):
    f = run_all.parse_forward(FORWARD)
    assert [x["value"] for x in f] == [1.234, 3.0] and f[0]["ratio"] == pytest.approx(2.0)
    assert f[0]["met"] is True and f[1]["met"] is False and f[0]["baseline"] == 2.468
    d = run_all.parse_decode(DECODE)
    assert [(x["value"], x["baseline"], x["ratio"]) for x in d] == [(150.0, 50.0, 3.0), (800.0, 400.0, 2.0)]
    assert d[1]["note"] == "same tokens 98.4%" and "batch 8" in d[1]["figure"]
    p = run_all.parse_preprocess(PREPROCESS)
    assert (p[0]["value"], p[0]["baseline"], p[0]["ratio"]) == (48.0, 16.0, 3.0)
    assert (p[1]["value"], p[1]["baseline"], p[1]["ratio"]) == (80.0, 16.0, 5.0)
    assert p[1]["met"] is True and "2x" in p[1]["target"] and p[1]["note"] == "per-repeat 4.10-5.90x"
    dp = run_all.parse_data_pipeline(DATA)
    assert [x["value"] for x in dp] == [10.0, 15.0] and dp[0]["ratio"] is None and dp[1]["ratio"] == 1.5
    c = run_all.parse_convert(CONVERT)
    assert c[0]["value"] == 0.2 and (c[1]["value"], c[1]["baseline"], c[1]["met"]) == (1.5, 2.87, True)
    a = run_all.parse_arch_throughput(ARCH)
    assert [x["figure"].split(",")[1].split()[0] for x in a] == ["NVLM-X", "NVLM-H", "NVLM-D"]
    assert a[0]["ratio"] == 1.8 and a[0]["baseline"] == 1.11 and a[0]["met"] and "1.76x" in a[0]["target"]
    m = run_all.parse_memory_plan(MEMORY)
    assert [(x["value"], x["met"]) for x in m] == [(20.5, True), (90.0, False)]
    t = run_all.parse_train_step(TRAIN)
    assert [(x["value"], x["unit"]) for x in t] == [(2500.0, "ms"), (52.0, "%")]
    assert "104.5M NVLM-D, stage sft (94.3M trained), bfloat16, batch 4 x 1024 tokens + 1 tile(s)" in t[0]["figure"]
    assert t[0]["note"] == "1040.0 GFLOP/s" and "2000.0 GFLOP/s" in t[1]["note"]  # the peak used, not the first
    assert t[1]["met"] is True and t[1]["target"] == ">= 50%"
    at = run_all.parse_attention(ATTENTION)
    assert [x["value"] for x in at] == [2.0, 6.0, 1.0, 3.0]
    assert at[0]["ratio"] == 2.0 and at[2]["met"] is False and "vit 7x1025" in at[0]["figure"]


def test_unrecognised_output_gives_no_figures(run_all):
    for parse in (run_all.parse_forward, run_all.parse_decode, run_all.parse_memory_plan, run_all.parse_attention,
                  run_all.parse_train_step, run_all.parse_preprocess, run_all.parse_convert):
        assert parse("Traceback (most recent call last):\nboom\n") == []


def test_every_bench_script_is_registered(run_all, tmp_path):
    names = run_all.discover()
    assert set(run_all.BENCHES) <= set(names)
    assert "run_all" not in names
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "new_bench.py").write_text('if __name__ == "__main__":\n    print(1)\n')
    assert run_all.discover(tmp_path) == ["new_bench"]


def test_a_gpu_bench_is_skipped_with_its_reason_on_cpu(run_all):
    r = run_all.run_bench("attention", quick=True, accelerator=False, timeout=5, machine={"cpus": 2, "cpu": "x"},
                          date="2026-01-01")
    assert r["status"] == "skipped" and r["reason"].startswith("needs a GPU/TPU")


def _results(run_all):
    ok = {"name": "decode", "script": "bench/decode.py", "command": "python bench/decode.py --repeats=3",
          "status": "ok", "quick": False, "machine": "2x CPU, 24 GiB", "date": "2026-01-02", "seconds": 60.0,
          "figures": run_all.parse_decode(DECODE)}
    skipped = {"name": "attention", "script": "bench/attention.py", "status": "skipped", "quick": False,
               "machine": "2x CPU, 24 GiB", "date": "2026-01-02", "figures": [], "reason": "needs a GPU/TPU: x"}
    return ok, skipped


def test_results_merge_by_bench_and_keep_the_others(run_all):
    ok, skipped = _results(run_all)
    old = run_all.merge_results(None, [dict(ok, date="2025-12-31"), skipped], {"cpu": "x"})
    new = run_all.merge_results(old, [ok], {"cpu": "y"})
    assert [b["name"] for b in new["benches"]] == ["decode", "attention"]
    assert new["benches"][0]["date"] == "2026-01-02" and new["benches"][1]["status"] == "skipped"
    assert json.loads(json.dumps(new)) == new


def test_notes_section_is_replaced_between_markers_only(run_all):
    ok, skipped = _results(run_all)
    section = run_all.performance_markdown(run_all.merge_results(None, [ok, skipped], {}))
    assert "| greedy decoding, batch 1 (vs transformers generate) (same tokens 100.0%) | 150 tok/s | 50 tok/s | " \
           "3.00x speed-up | >= 1x | yes | 2x CPU, 24 GiB | 2026-01-02 |" in section
    assert "- `bench/attention.py`: skipped, needs a GPU/TPU: x" in section
    notes = "# Build notes\n\n## Decisions\n\nkeep\n\n## Performance\n\n(Results below.)\n\n## Known gaps\n\ngap\n"
    first = run_all.update_notes(notes, section)
    assert first.startswith("# Build notes\n\n## Decisions\n\nkeep\n\n## Performance\n\n<!-- perf:begin -->\n")
    assert first.endswith("<!-- perf:end -->\n\n(Results below.)\n\n## Known gaps\n\ngap\n")
    second = run_all.update_notes(first, "new table\n")
    assert "new table" in second and "150 tok/s" not in second
    assert second.replace("new table", "") == first.replace(section.rstrip(), "")
    assert run_all.update_notes(second, "new table\n") == second
    with pytest.raises(ValueError, match="no '## Performance' heading"):
        run_all.update_notes("# notes\n", section)
    with pytest.raises(ValueError, match="broken pair"):
        run_all.update_notes("## Performance\n<!-- perf:end -->\n<!-- perf:begin -->\n", section)


def test_json_figures_from_a_script_are_validated(run_all, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"figure": "step time", "value": 1.5, "unit": "s", "baseline": 3.0, "ratio": 2.0}]))
    (fig,) = run_all.parse_json_figures(path)
    assert fig["figure"] == "step time" and fig["ratio"] == 2.0 and fig["met"] is None
    path.write_text(json.dumps([{"figure": "x"}]))
    with pytest.raises(ValueError, match="needs 'figure', 'value' and 'unit'"):
        run_all.parse_json_figures(path)

"""Runs every bench script, collects their figures into JSON and regenerates BUILD_NOTES' table.

    python bench/run_all.py                         # all benches, full sizes (long: ~1 h on 2 CPUs)
    python bench/run_all.py --only=decode,forward   # some of them (the others keep their last results)
    python bench/run_all.py --quick                 # reduced sizes/repeats, to check the scripts run

Each script runs as its own subprocess (fixed seeds inside the scripts, `PYTHONHASHSEED=0`,
fixed arguments per mode in `BENCHES`); its printed table is parsed into figure records:
{"figure", "value", "unit", "baseline", "ratio", "ratio_label", "target", "met", "note"}.
`ratio` relates value and baseline as `ratio_label` says (e.g. "speed-up": baseline time / our time). A script
that needs an accelerator this machine lacks is recorded as skipped with the reason; a script
that fails or prints nothing recognisable is recorded as failed with the end of its output.
Scripts in bench/ that are not in `BENCHES` run only if their `--help` offers `--json PATH`
(they then write a list of figure records themselves); otherwise they are listed as skipped.

Results are merged into `--json` (default `bench/results.json`; quick runs:
`bench/results_quick.json`) by bench name, each with its own machine and date, and a full run
rewrites the part of BUILD_NOTES.md's "## Performance" section between `<!-- perf:begin -->` and
`<!-- perf:end -->` (inserted under the heading when missing; nothing else is edited).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
HEADING = "## Performance"

Figure = dict[str, Any]


def figure(name: str, value: float, unit: str, *, baseline: float | None = None, ratio: float | None = None,
           ratio_label: str = "", target: str = "", met: bool | None = None, note: str = "") -> Figure:
    return dict(figure=name, value=value, unit=unit, baseline=baseline, ratio=ratio, ratio_label=ratio_label,
                target=target, met=met, note=note)


_NUM = r"([-+]?\d+(?:\.\d+)?)"


# ---- parsers: each turns a script's stdout into figures ----------------------------------------------


def parse_forward(out: str) -> list[Figure]:
    figs = []
    for dtype, ours, torch in re.findall(rf"^(float32|bfloat16)\s+jax\s+{_NUM} s\s+torch\s+{_NUM} s", out, re.M):
        ours, torch = float(ours), float(torch)
        figs.append(figure(f"NVLM-D prefill, {dtype} (jit vs transformers, same CPU)", ours, "s", baseline=torch,
                           ratio=torch / ours, ratio_label="speed-up", target=">= 1x (not slower than torch)",
                           met=ours <= torch))
    return figs


def parse_decode(out: str) -> list[Figure]:
    figs = []
    pattern = (rf"^batch (\d+): nvlm_jax\s+{_NUM} tok/s .*?\| transformers\s+{_NUM} tok/s .*?\| speed-up {_NUM}x"
               rf" \| same tokens {_NUM}%")
    for batch, ours, hf, speed, same in re.findall(pattern, out, re.M):
        figs.append(figure(f"greedy decoding, batch {batch} (vs transformers generate)", float(ours), "tok/s",
                           baseline=float(hf), ratio=float(speed), ratio_label="speed-up", target=">= 1x",
                           met=float(speed) >= 1.0, note=f"same tokens {same}%"))
    return figs


def parse_preprocess(out: str) -> list[Figure]:
    figs = []
    m = re.search(rf"^images/s\s+{_NUM}\s+{_NUM}", out, re.M)
    base = float(m.group(2)) if m else None
    if m:
        ours = float(m.group(1))
        figs.append(figure("host preprocessing (decode+tile+prompt+tokenize), 1 thread", ours, "images/s",
                           baseline=base, ratio=ours / base, ratio_label="speed-up", target="> 1x the baseline",
                           met=ours > base))
    m = re.search(rf"^tile_images on (\d+) threads: {_NUM} images/s, {_NUM}x", out, re.M)
    if m:
        spread = re.search(rf"range {_NUM}-{_NUM}x", out)
        figs.append(figure(f"host preprocessing, tile_images on {m.group(1)} threads", float(m.group(2)),
                           "images/s", baseline=base, ratio=float(m.group(3)),
                           ratio_label="speed-up vs the 1-thread baseline (median of per-repeat ratios)",
                           target=">= 2x the baseline", met=float(m.group(3)) >= 2.0,
                           note=f"per-repeat {spread.group(1)}-{spread.group(2)}x" if spread else ""))
    return figs


def parse_data_pipeline(out: str) -> list[Figure]:
    rows = re.findall(rf"^\s*(\d+)\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+{_NUM}\s*$", out, re.M)
    figs = []
    for i, (workers, samples, tokens, _batches, tiles, _per_row, fill, _cpu) in enumerate(rows):
        base_workers, base = rows[0][0], float(rows[0][1])  # the first row (0 workers) is the baseline
        figs.append(figure(f"data pipeline end to end, {workers} workers", float(samples), "samples/s",
                           baseline=base if i else None, ratio=float(samples) / base if i else None,
                           ratio_label=f"vs {base_workers} workers",
                           note=f"{float(tokens):.0f} tokens/s, {tiles} tiles/sample, token fill {fill}"))
    return figs


def parse_convert(out: str) -> list[Figure]:
    figs = []
    m = re.search(rf"^convert: {_NUM} s, {_NUM} GB/s", out, re.M)
    if m:
        figs.append(figure("HF -> Orbax conversion throughput (from disk)", float(m.group(2)), "GB/s",
                           note=f"{float(m.group(1)):.1f} s"))
    m = re.search(rf"^peak RSS \(VmHWM\): {_NUM} GB; target .*? = {_NUM} GB", out, re.M)
    if m:
        peak, target = float(m.group(1)), float(m.group(2))
        figs.append(figure("conversion peak host memory (VmHWM)", peak, "GB", baseline=target,
                           ratio=peak / target, ratio_label="of the target",
                           target=f"<= 1.5 x largest tensor + 1 GB = {target:.2f} GB", met=peak <= target))
    return figs


def parse_arch_throughput(out: str) -> list[Figure]:
    rows = re.findall(rf"^([DXH]) \| (\d+) \| {_NUM} \| {_NUM} \| {_NUM}x \| (\d+) \| {_NUM}x\s*$", out, re.M)
    by_arch = {r[0]: r for r in rows}
    figs = []
    for arch, length, _per, rate, rel, paper_len, paper_rel in rows:
        d_rate = float(by_arch["D"][3]) if "D" in by_arch else None
        figs.append(figure(f"SFT step throughput, NVLM-{arch} ({length} decoder tokens; paper {paper_len})",
                           float(rate), "samples/s", baseline=d_rate if arch != "D" else None,
                           ratio=float(rel) if arch != "D" else None, ratio_label="vs NVLM-D",
                           target=f"paper Table 3: {paper_rel}x NVLM-D" if arch != "D" else "",
                           met=(float(rel) > 1.0) == (float(paper_rel) > 1.0) if arch != "D" else None))
    return figs


def parse_memory_plan(out: str) -> list[Figure]:
    pattern = (rf"^([DXH]) \| (\w+) \| (\d+) \| [^|]+ \| (\d+x\d+) \| {_NUM} \| {_NUM} \| {_NUM} \| {_NUM} \| "
               rf"{_NUM} \| (yes|no) \| (yes|no)\s*$")
    figs = []
    for arch, mesh, devices, shape, _args, _temp, total, analytic, _compile, fits80, fits95 in re.findall(
            pattern, out, re.M):
        figs.append(figure(f"72B NVLM-{arch} {mesh} ({devices} devices, batch x seq {shape}), per device",
                           float(total), "GiB", baseline=float(analytic), ratio=float(total) / float(analytic),
                           ratio_label="vs analytic params+state", target="fits 80 GB (H100)", met=fits80 == "yes",
                           note=f"fits 95 GB: {fits95}"))
    return figs


def parse_attention(out: str) -> list[Figure]:
    figs = []
    for block in re.split(r"\n(?=\S[^\n]*: b=\d+)", out):
        head = re.match(r"(\S[^\n]*?): b=", block)
        if not head:
            continue
        times = {impl: (fwd, both) for impl, fwd, both in
                 re.findall(rf"^  (\S+)\s+{_NUM}\s+{_NUM}\s*$", block, re.M)}
        if "pallas" not in times:
            continue
        for k, label in ((0, "fwd"), (1, "fwd+bwd")):
            ours = float(times["pallas"][k])
            base = float(times["xla"][k]) if "xla" in times else None
            figs.append(figure(f"attention {head.group(1)}, {label}, Pallas kernel (vs XLA path)", ours, "ms",
                               baseline=base, ratio=base / ours if base else None, ratio_label="speed-up",
                               target=">= 1x the XLA path", met=(ours <= base) if base else None))
    return figs


def parse_train_step(out: str) -> list[Figure]:
    model = re.search(r"^model: ([\d.]+M) params \(([\d.]+M) trained, stage (\w+)\), dtype (\w+)", out, re.M)
    batch = re.search(r"^batch: (\d+) x (\d+) tokens, (\d+) tile", out, re.M)
    step = re.search(rf"step median {_NUM} ms", out)
    rate = re.search(rf"-> {_NUM} GFLOP/s", out)
    mfu = re.search(rf"^MFU {_NUM}%", out, re.M)
    peak = re.search(rf"^peak .*-> {_NUM}\s*$", out, re.M)  # the peak used (the larger of two)
    if not (model and batch and step):
        return []
    what = (f"{model.group(1)} NVLM-D, stage {model.group(3)} ({model.group(2)} trained), {model.group(4)}, "
            f"batch {batch.group(1)} x {batch.group(2)} tokens + {batch.group(3)} tile(s)")
    figs = [figure(f"training step time, {what}", float(step.group(1)), "ms",
                   note=f"{rate.group(1)} GFLOP/s" if rate else "")]
    if mfu:
        figs.append(figure(f"training MFU, {what}", float(mfu.group(1)), "%", target=">= 50%",
                           met=float(mfu.group(1)) >= 50.0,
                           note=f"of a measured bf16 matmul peak of {peak.group(1)} GFLOP/s" if peak else ""))
    return figs


def parse_json_figures(path: Path) -> list[Figure]:
    """Figure records a script wrote with `--json PATH` (a list of dicts with at least
    "figure", "value", "unit")."""
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of figure records")
    out = []
    for r in records:
        if not isinstance(r, dict) or not {"figure", "value", "unit"} <= set(r):
            raise ValueError(f"{path}: a figure record needs 'figure', 'value' and 'unit', got {r!r}")
        out.append(figure(r["figure"], r["value"], r["unit"], **{k: r[k] for k in
                                                                   ("baseline", "ratio", "ratio_label", "target",
                                                                    "met", "note") if k in r}))
    return out


# ---- the registry ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bench:
    """A bench script: its arguments per mode, what it needs, how to read its output."""

    name: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    parse: Callable[[str], list[Figure]]
    needs_accelerator: str = ""  # why it needs a GPU/TPU ("" = runs anywhere)

    @property
    def script(self) -> Path:
        return REPO / "bench" / f"{self.name}.py"


BENCHES: dict[str, Bench] = {b.name: b for b in [
    Bench("preprocess", ("--repeats=9",), ("--repeats=1",), parse_preprocess),
    Bench("data_pipeline", ("--batches=20", "--workers=0,1,2"), ("--batches=2", "--workers=0"), parse_data_pipeline),
    Bench("forward", ("--repeats=3",), ("--repeats=1",), parse_forward),
    Bench("decode", ("--repeats=3", "--new_tokens=64", "--prompt_len=64"),
          ("--repeats=1", "--new_tokens=8", "--prompt_len=16"), parse_decode),
    Bench("convert", ("--llm_layers=3", "--shard_gb=1.0"), ("--llm_layers=1", "--shard_gb=0.5"), parse_convert),
    Bench("arch_throughput", ("--batch=2", "--repeats=3"), ("--batch=1", "--repeats=1"), parse_arch_throughput),
    Bench("train_step", ("--batch=8", "--seq=512", "--steps=5"),
          ("--batch=1", "--seq=256", "--steps=2", "--peak_size=1024"), parse_train_step),
    Bench("memory_plan", ("--archs=D,X,H", "--meshes=infer8,train64,train128"), ("--archs=D", "--meshes=infer8"),
          parse_memory_plan),
    Bench("attention", ("--repeats=10",), ("--repeats=2",), parse_attention,
          needs_accelerator="times the compiled Pallas kernel; on CPU it only runs in interpret mode, whose timings "
                            "mean nothing (use --cpu-smoke by hand to check it runs)"),
]}


def discover(bench_dir: Path = REPO / "bench") -> list[str]:
    """Bench script names in bench/ (registered ones first, in registry order); a script is a
    file with a `__main__` guard (shared helper modules are not run)."""
    found = sorted(p.stem for p in bench_dir.glob("*.py")
                   if p.stem != "run_all" and '__name__ == "__main__"' in p.read_text(encoding="utf-8"))
    return [n for n in BENCHES if n in found] + [n for n in found if n not in BENCHES]


# ---- running -----------------------------------------------------------------------------------------


def probe_machine() -> dict[str, Any]:
    """This machine: CPU model and count, memory, and JAX's default backend (probed in a
    subprocess so this process never holds an accelerator the benches need)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gib = round(kb / 1024**2)
    except (OSError, AttributeError):
        pass
    backend, device = "unknown", ""
    probe = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; print(d.platform, '|', "
                            "d.device_kind)"], capture_output=True, text=True, timeout=300)
    if probe.returncode == 0 and "|" in probe.stdout:
        backend, device = (s.strip() for s in probe.stdout.strip().splitlines()[-1].split("|", 1))
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": mem_gib, "backend": backend, "device": device,
            "python": platform.python_version()}


def describe(machine: dict[str, Any]) -> str:
    text = f"{machine.get('cpus')}x {machine.get('cpu')}, {machine.get('memory_gib')} GiB"
    if machine.get("backend") not in ("cpu", "unknown", None):
        text += f", {machine.get('device')}"
    return text


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def supports_json(script: Path) -> bool:
    try:
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                              cwd=REPO)
    except subprocess.TimeoutExpired:
        return False
    return "--json" in done.stdout


def run_bench(name: str, *, quick: bool, accelerator: bool, timeout: float, machine: dict[str, Any],
              date: str) -> dict[str, Any]:
    """Runs one bench script and returns its result record."""
    bench = BENCHES.get(name)
    script = REPO / "bench" / f"{name}.py"
    result: dict[str, Any] = {"name": name, "script": f"bench/{name}.py", "quick": quick,
                              "machine": describe(machine), "date": date, "figures": []}
    json_path = None
    if bench is None:
        if not supports_json(script):
            return dict(result, status="skipped", reason="no output parser in bench/run_all.py and no --json flag")
        json_path = REPO / "bench" / f".{name}.run_all.json"
        args = [f"--json={json_path}"]
    else:
        if bench.needs_accelerator and not accelerator:
            return dict(result, status="skipped", reason=f"needs a GPU/TPU: it {bench.needs_accelerator}")
        args = list(bench.quick_args if quick else bench.args)
    result["command"] = " ".join(["python", result["script"], *args])
    env = dict(os.environ, PYTHONHASHSEED="0")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return dict(result, status="failed", reason=f"timed out after {timeout:.0f} s", output_tail=_tail(out),
                    seconds=round(time.perf_counter() - start, 1))
    result["seconds"] = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        return dict(result, status="failed", reason=f"exit code {done.returncode}",
                    output_tail=_tail(done.stdout + "\n" + done.stderr))
    try:
        figures = parse_json_figures(json_path) if json_path else bench.parse(done.stdout)
    except (ValueError, OSError) as e:
        return dict(result, status="failed", reason=f"cannot read its figures: {e}", output_tail=_tail(done.stdout))
    finally:
        if json_path is not None:
            json_path.unlink(missing_ok=True)
    if not figures:
        return dict(result, status="failed", reason="its output has no figure this script recognises",
                    output_tail=_tail(done.stdout))
    return dict(result, status="ok", figures=figures, output_tail=_tail(done.stdout, 40))


def merge_results(old: dict[str, Any] | None, new_benches: Sequence[dict[str, Any]],
                  machine: dict[str, Any]) -> dict[str, Any]:
    """`old` results with the benches in `new_benches` replaced (by name), in registry order."""
    benches = {b["name"]: b for b in (old or {}).get("benches", [])}
    benches.update({b["name"]: b for b in new_benches})
    order = {n: i for i, n in enumerate(BENCHES)}
    ordered = sorted(benches.values(), key=lambda b: (order.get(b["name"], len(order)), b["name"]))
    return {"generated_by": "bench/run_all.py", "machine": machine, "benches": ordered}


# ---- BUILD_NOTES ---------------------------------------------------------------------------------------


def _fmt(x: Any, unit: str = "") -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, float):
        text = f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    else:
        text = str(x)
    return f"{text} {unit}".strip()


def performance_markdown(results: dict[str, Any]) -> str:
    """The table that goes between the perf markers."""
    lines = ["Generated by `python bench/run_all.py` from `bench/results.json`; do not edit by hand. Ratios are",
             "against a baseline measured in the same run.", "",
             "| figure | value | baseline | ratio | target | met | machine | date |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    done = {b["name"] for b in results.get("benches", [])}
    for name in BENCHES:
        if name not in done:
            notes.append(f"- `bench/{name}.py`: not run yet")
    for bench in results.get("benches", []):
        where = f"`{bench.get('command') or bench['script']}`"
        if bench.get("status") != "ok":
            notes.append(f"- {where}: {bench.get('status')}, {bench.get('reason', '')}".rstrip(", "))
            continue
        for f in bench["figures"]:
            ratio = "–" if f.get("ratio") is None else f"{f['ratio']:.2f}x {f.get('ratio_label', '')}".strip()
            met = {True: "yes", False: "no"}.get(f.get("met"), "–")
            name = f["figure"] + (f" ({f['note']})" if f.get("note") else "")
            lines.append(f"| {name} | {_fmt(f['value'], f['unit'])} | {_fmt(f.get('baseline'), f['unit'])} | {ratio} "
                         f"| {f.get('target') or '–'} | {met} | {bench['machine']} | {bench['date']} |")
        notes.append(f"- {where}: {bench.get('seconds', '?')} s" + (" (quick sizes)" if bench.get("quick") else ""))
    return "\n".join(lines + ["", "Commands:", *notes]) + "\n"


def update_notes(text: str, section: str) -> str:
    """`text` (BUILD_NOTES.md) with the perf markers' contents replaced by `section`; markers
    are inserted right under the "## Performance" heading when missing."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text or END in text:
        start, end = text.find(BEGIN), text.find(END)
        if start < 0 or end < start:
            raise ValueError(f"BUILD_NOTES.md has a broken pair of {BEGIN} / {END} markers")
        return text[:start] + block + text[end + len(END):]
    m = re.search(rf"^{re.escape(HEADING)}[ \t]*\n", text, re.M)
    if not m:
        raise ValueError(f"BUILD_NOTES.md has no '{HEADING}' heading to put the results under")
    return text[: m.end()] + "\n" + block + "\n" + text[m.end():]


# ---- CLI ------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_bool("quick", False, "Reduced sizes and repeats (checks that every script runs; numbers are rough).")
    flags.DEFINE_list("only", [], "Run only these benches (names of bench/*.py); the others keep their results.")
    flags.DEFINE_string("json", None, "Results file (default bench/results.json; quick: bench/results_quick.json).")
    flags.DEFINE_string("notes", None, "BUILD_NOTES.md to update (default: BUILD_NOTES.md for full runs, none for "
                        "quick runs; '' = none).")
    flags.DEFINE_float("timeout", None, "Seconds per bench (default 3600; quick 900).")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quick = FLAGS.quick
    names = discover()
    unknown = sorted(set(FLAGS.only) - set(names))
    if unknown:
        raise app.UsageError(f"--only names unknown benches {unknown}; available: {names}")
    if FLAGS.only:
        names = [n for n in names if n in FLAGS.only]
    json_path = Path(FLAGS.json or REPO / "bench" / ("results_quick.json" if quick else "results.json"))
    notes = FLAGS.notes if FLAGS.notes is not None else ("" if quick else str(REPO / "BUILD_NOTES.md"))
    timeout = FLAGS.timeout or (900.0 if quick else 3600.0)
    machine = probe_machine()
    accelerator = machine["backend"] in ("gpu", "tpu", "cuda", "rocm")
    date = datetime.date.today().isoformat()
    print(f"{len(names)} benches on {describe(machine)} ({machine['backend']}), {'quick' if quick else 'full'} sizes")
    old = json.loads(json_path.read_text()) if json_path.is_file() else None
    for name in names:
        print(f"-> {name} ...", flush=True)
        r = run_bench(name, quick=quick, accelerator=accelerator, timeout=timeout, machine=machine, date=date)
        summary = f"{len(r['figures'])} figures" if r["status"] == "ok" else r.get("reason", "")
        print(f"   {r['status']} ({r.get('seconds', 0)} s): {summary}", flush=True)
        if r["status"] == "failed" and r.get("output_tail"):
            print("   " + r["output_tail"].replace("\n", "\n   "), flush=True)
        # Written after every bench, so an interrupted run keeps what it measured.
        old = merge_results(old, [r], machine)
        json_path.write_text(json.dumps(old, indent=2) + "\n")
        if notes:
            path = Path(notes)
            path.write_text(update_notes(path.read_text(), performance_markdown(old)))
    print(f"wrote {json_path}" + (f" and the performance section of {notes}" if notes else ""))


if __name__ == "__main__":
    define_flags()
    app.run(main)

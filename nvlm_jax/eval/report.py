"""A Markdown results table next to the paper's Table 7 (72B models).

    python -m nvlm_jax.eval.report --summaries=eval_out --out=table.md

collects every `*summary.json` under `--summaries` (as written by `python -m nvlm_jax.eval`)
and writes the table (also printed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from absl import app, flags

# Paper Table 7 (arXiv 2409.11402v2), 72B models. MMMU: val; AI2D: test (mask setting);
# OCRBench out of 1000; others in %.
PAPER_TABLE7: dict[str, dict[str, float]] = {
    "NVLM-D 1.0 72B": {"mmmu": 59.7, "mathvista": 65.2, "vqav2": 85.4, "ai2d": 85.2, "textvqa": 82.1,
                       "chartqa": 86.0, "docvqa": 92.6, "realworldqa": 69.7, "ocrbench": 853},
    "NVLM-X 1.0 72B": {"mmmu": 57.4, "mathvista": 64.6, "vqav2": 85.2, "ai2d": 84.2, "textvqa": 80.2,
                       "chartqa": 82.9, "docvqa": 82.9, "realworldqa": 66.1, "ocrbench": 828},
    "NVLM-H 1.0 72B": {"mmmu": 60.2, "mathvista": 66.6, "vqav2": 85.2, "ai2d": 83.8, "textvqa": 80.3,
                       "chartqa": 83.3, "docvqa": 83.1, "realworldqa": 66.0, "ocrbench": 831},
}
BENCHMARKS = ["mmmu", "mathvista", "vqav2", "ai2d", "textvqa", "chartqa", "docvqa", "realworldqa", "ocrbench"]


def load_summaries(paths: Sequence[str]) -> dict[str, dict[str, float]]:
    """Reads summary JSONs ({"model": name, "task": name, "score": value, ...}) into
    {model: {task: score}}. Raises ValueError naming a file that lacks a field."""
    table: dict[str, dict[str, float]] = {}
    for path in paths:
        with open(path) as f:
            summary = json.load(f)
        for key in ("model", "task", "score"):
            if key not in summary:
                raise ValueError(f"{path}: summary has no {key!r} field")
        table.setdefault(summary["model"], {})[summary["task"]] = float(summary["score"])
    return table


def markdown_table(ours: Mapping[str, Mapping[str, float]], tasks: Sequence[str] | None = None) -> str:
    """Rows for our models, then the paper's rows, over `tasks` (default: all benchmarks that
    appear in ours, plus the paper's). Missing entries show as "–"."""
    if tasks is None:
        seen = {t for scores in ours.values() for t in scores}
        tasks = [t for t in BENCHMARKS if t in seen] + sorted(seen - set(BENCHMARKS)) or BENCHMARKS
    header = "| model | " + " | ".join(tasks) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 1)]

    def row(name, scores, note=""):
        cells = [f"{scores[t]:.1f}" if t in scores and t != "ocrbench" else
                 (f"{scores[t]:.0f}" if t in scores else "–") for t in tasks]
        lines.append(f"| {name}{note} | " + " | ".join(cells) + " |")

    for name, scores in ours.items():
        row(name, scores)
    for name, scores in PAPER_TABLE7.items():
        row(name, scores, " (paper)")
    return "\n".join(lines) + "\n"


def write_table(summary_dir: str, out_path: str) -> str:
    """Collects every `*summary.json` under summary_dir and writes the Markdown table."""
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(summary_dir)
                   for f in files if f.endswith("summary.json"))
    text = markdown_table(load_summaries(paths))
    with open(out_path, "w") as f:
        f.write(text)
    return text


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("summaries", None, "Folder searched (recursively) for *summary.json files.")
    flags.DEFINE_string("out", "table.md", "Markdown file to write.")
    flags.mark_flag_as_required("summaries")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not os.path.isdir(FLAGS.summaries):
        raise app.UsageError(f"--summaries={FLAGS.summaries} is not a folder")
    print(write_table(FLAGS.summaries, FLAGS.out), end="")


if __name__ == "__main__":
    define_flags()
    app.run(main)

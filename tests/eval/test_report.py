"""The results table puts our numbers next to the paper's Table 7."""

import json

import pytest

from nvlm_jax.eval import report


def test_table_has_our_rows_and_the_paper_rows(tmp_path):
    for task, score in [("vqav2", 81.25), ("ocrbench", 700)]:
        (tmp_path / f"{task}_summary.json").write_text(json.dumps({"model": "ours", "task": task, "score": score}))
    text = report.write_table(str(tmp_path), str(tmp_path / "table.md"))
    lines = text.splitlines()
    assert lines[0] == "| model | vqav2 | ocrbench |"
    assert lines[2] == "| ours | 81.2 | 700 |"
    assert "| NVLM-D 1.0 72B (paper) | 85.4 | 853 |" in lines
    assert (tmp_path / "table.md").read_text() == text


def test_summary_without_score_names_the_file(tmp_path):
    bad = tmp_path / "x_summary.json"
    bad.write_text(json.dumps({"model": "m", "task": "t"}))
    with pytest.raises(ValueError, match="x_summary.json.*'score'"):
        report.load_summaries([str(bad)])

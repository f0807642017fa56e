"""Reports people read: the curves PNG and the markdown table made from metrics.jsonl."""

import json

from transfer import demo, plots


def test_report_table_and_curves(tmp_path):
    rows = [{"step": 10, "train/loss": 2.0}, {"step": 20, "train/loss": 1.5, "val/prec@1": 0.25},
            {"step": 30, "train/loss": 1.0, "val/prec@1": 0.5, "val/loss": 0.75}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = demo.write_report(str(tmp_path), "Title", "sub")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report.md").read_text() == report
    lines = report.splitlines()
    header = lines.index("| step | val/loss | val/prec@1 |")
    assert lines[header + 2 : header + 4] == ["| 20 |  | 0.2500 |", "| 30 | 0.7500 | 0.5000 |"]


def test_markdown_table_formats():
    table = plots.markdown_table([{"a": 1, "b": 0.123456}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]

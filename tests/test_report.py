"""The markdown table that reports are made of."""

from transfer import plots


def test_markdown_table_formats():
    table = plots.markdown_table([{"a": 1, "b": 0.123456}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]


def test_curve_keys_skip_constants_counters_and_baselines_with_a_metric():
    rows = [
        {"step": 1, "train/loss": 2.0, "perf/flops_per_example": 5.0, "input/skipped": 0},
        {"step": 2, "train/loss": 1.0, "perf/flops_per_example": 5.0, "input/skipped": 0},
        {"step": 2, "caption/CIDEr": 0.5, "caption/baseline/CIDEr": 0.1, "x/baseline/only": 1.0},
    ]
    # A one-point series stays (an end-only evaluator); a baseline without its metric keeps its panel.
    assert plots.curve_keys(rows) == ["caption/CIDEr", "train/loss", "x/baseline/only"]


def test_plot_run_writes_a_png(tmp_path):
    import json

    rows = [
        {"step": s, "train/loss": 1 / s, "val/acc": 0.1 * s, "val/baseline/acc": 0.1}
        for s in (1, 2)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plots.plot_run(str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_run_with_nothing_logged_still_writes_a_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")  # a total_steps=0 run without evaluators
    with open(plots.plot_run(str(tmp_path)), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

"""The markdown table that reports are made of."""

from transfer import plots


def test_markdown_table_formats():
    table = plots.markdown_table([{"a": 1, "b": 0.123456}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]

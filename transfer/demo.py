"""`cappa demo` / `make demo`: the main job on the embedded data, end to end, in a few minutes on a CPU.

Trains the classifier of configs/classify.py on the embedded `scenes` dataset, evaluates it, and writes
WORKDIR/report.md (a table) and WORKDIR/curves.png next to the usual run outputs.
"""

from __future__ import annotations

import argparse
import os

from transfer import config as config_lib
from transfer import metrics, plots

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "classify.py"
)


def write_report(workdir: str, title: str, subtitle: str) -> str:
    """WORKDIR/curves.png and WORKDIR/report.md (a table of every evaluation row); returns the markdown."""
    curves = plots.plot_run(workdir)
    rows = [
        r
        for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if any(k.startswith("val/") for k in r)
    ]
    cols = ["step"] + sorted({k for r in rows for k in r if k.startswith("val/")})
    report = "\n".join(
        [f"# {title}", "", subtitle, "", plots.markdown_table(rows, cols), "",
         f"![curves]({os.path.basename(curves)})", ""]
    )  # fmt: skip
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(report)
    return report


def main(argv: list[str]) -> int:
    argv, overrides = config_lib.split_cli_overrides(argv)
    parser = argparse.ArgumentParser(prog="cappa demo", description=__doc__)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    import jax

    from transfer import train

    config, _ = train.prepare_config(config_lib.load_config_file(args.config))
    config_lib.apply_overrides(config, overrides)
    result = train.train(config, args.workdir)
    if jax.process_index() == 0:  # Only one process writes files.
        report = write_report(
            args.workdir,
            "Demo: ViT classifier on the embedded `scenes` data",
            f"config: `{args.config}`, {config.total_steps} steps, batch {config.input.batch_size}",
        )
        print(report)
        print(f"Wrote {args.workdir}/report.md and {args.workdir}/curves.png.")
    return 0 if result.metrics else 1

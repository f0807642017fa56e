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


def main(argv: list[str]) -> int:
    argv, overrides = config_lib.split_cli_overrides(argv)
    parser = argparse.ArgumentParser(prog="cappa demo", description=__doc__)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    from transfer import train

    config, _ = train.prepare_config(config_lib.load_config_file(args.config))
    config_lib.apply_overrides(config, overrides)
    result = train.train(config, args.workdir)
    curves = plots.plot_run(args.workdir)
    rows = [
        r
        for r in metrics.read_jsonl(os.path.join(args.workdir, "metrics.jsonl"))
        if any(k.startswith("val/") for k in r)
    ]
    cols = ["step"] + sorted({k for r in rows for k in r if k.startswith("val/")})
    report = "\n".join(
        [
            "# Demo: ViT classifier on the embedded `scenes` data",
            "",
            f"config: `{args.config}`, {config.total_steps} steps, batch {config.input.batch_size}",
            "",
            plots.markdown_table(rows, cols),
            "",
            f"![curves]({os.path.basename(curves)})",
            "",
        ]
    )
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(report)
    print(report)
    print(f"Wrote {args.workdir}/report.md and {curves}.")
    return 0 if result.metrics else 1

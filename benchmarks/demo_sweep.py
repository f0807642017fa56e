"""The demo's recipe sweep: which tiny CapPa recipe, within the demo's budget, makes the best tower?

    .venv/bin/python benchmarks/demo_sweep.py --workdir runs/sweep [--recipes base,pa25] [--data_dir DIR]

Prepares the embedded data and tokenizer the way `make demo` does (tasks/demo/pipeline.py), then for each
recipe of `RECIPES` pretrains configs/cappa_tiny.py with the recipe's overrides and probes its tower with the
demo's few-shot protocol (10 and 25 shots x 3 seeds on scenes, its shape / colour / count factors and digits).
The references are probed the same way: raw pixels, and the random-init tower of every architecture the
recipes use. Prints one JSON object per probe and writes WORKDIR/sweep.json and WORKDIR/sweep.md (the table of
docs/demo_sweep.md). Every stage is reused when its result exists, so a sweep can be extended recipe by recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DATASETS = ("scenes", "scenes_shape", "scenes_color", "scenes_count", "digits")
SHOTS = (10, 25)
# Overrides of configs/cappa_tiny.py (dotted keys). "arch" keys change the tower's shape (and so its random twin).
RECIPES: dict[str, dict[str, Any]] = {
    "base": {},  # configs/cappa_tiny.py as it is
    "s3000": {"total_steps": 3000},
    "s3000_pa50": {"total_steps": 3000, "masked_pred_prob": 0.5},
    "s3000_pa25": {"total_steps": 3000, "masked_pred_prob": 0.25},
    "s3000_lr3e-3": {"total_steps": 3000, "lr": 3e-3},
    "s3000_lr1e-3": {"total_steps": 3000, "lr": 1e-3},
    "b128_s1500": {"total_steps": 1500, "input.batch_size": 128},
    "s1500_patch8": {"total_steps": 1500, "model.img.patch_size": 8},
    "s3000_depth6": {"total_steps": 3000, "model.img.depth": 6},
}
ARCH_KEYS = ("model.img.",)


def arch_of(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change the image tower's shape: recipes sharing them share one random tower."""
    return {k: v for k, v in sorted(overrides.items()) if k.startswith(ARCH_KEYS)}


def _arch_name(arch: dict[str, Any]) -> str:
    return "random_" + ("_".join(f"{k.split('.')[-1]}{v}" for k, v in arch.items()) or "base")


def probe_config(ctx: Any) -> Any:
    from tasks import fewshot_report

    spec = os.path.join(ROOT, "configs", f"fewshot.py:{','.join(DATASETS)}")
    if ctx.data_dir:
        spec += f",data_dir={ctx.data_dir}"
    return fewshot_report.load_config(
        spec, {"shots": SHOTS, "cache_dir": ctx.path("feature_cache")}
    )


def summarise(report: dict) -> dict[str, dict[str, float]]:
    """{dataset: {"10": mean, "10_std": std, ...}} of a fewshot_report.probe report."""
    out = {}
    for name, result in report["datasets"].items():
        row = {}
        for k, v in result["shots"].items():
            row[k], row[f"{k}_std"] = v["mean"], v["std"]
        out[name] = row
    return out


def pixel_probe(ctx: Any) -> dict[str, dict[str, float]]:
    """The same protocol on raw pixels (the demo's pp: [-1, 1], the tower's resolution), flattened."""
    import numpy as np

    from tasks import fewshot
    from transfer import input_pipeline

    config = probe_config(ctx)
    out = {}
    for name, spec in fewshot.dataset_specs(dict(config.datasets)).items():
        sets = []
        for which in ("train", "test"):
            cfg = {
                "data": fewshot.split_data(spec, which),
                "pp": fewshot.resolve_pp(spec["pp"], 64),
            }
            xs, ys = [], []
            for batch in input_pipeline.eval_batches(
                cfg, batch_size=250, process_index=0, process_count=1
            ):
                mask = np.asarray(batch["_mask"], bool)
                xs.append(np.asarray(batch["image"], np.float32).reshape(len(mask), -1)[mask])
                ys.append(np.asarray(batch[spec["label_key"]])[mask])
            sets.append((np.concatenate(xs), np.concatenate(ys)))
        result = fewshot.run_protocol(sets[0], sets[1], shots=SHOTS, seeds=config.seeds)
        out[name] = {k: v["mean"] for k, v in result["shots"].items()}
        out[name].update({f"{k}_std": v["std"] for k, v in result["shots"].items()})
    return out


def run(workdir: str, names: list[str], data_dir: str | None) -> list[dict]:
    from tasks import fewshot_report
    from tasks.demo import pipeline

    ctx = pipeline.Context(os.path.abspath(workdir), data_dir, pipeline.FULL)
    pipeline.run_stages(ctx, only=["data", "tokenizer"])
    rows = []
    results_path = ctx.path("sweep.json")
    done = {}
    if os.path.exists(results_path):
        done = {r["name"]: r for r in json.load(open(results_path))}

    def keep(row: dict) -> None:
        rows.append(row)
        done[row["name"]] = row
        print(json.dumps(row), flush=True)
        with open(results_path, "w") as f:
            json.dump(list(done.values()), f, indent=1)

    if "pixels" not in done:
        t0 = time.monotonic()
        keep(
            dict(name="pixels", overrides={}, probe=pixel_probe(ctx), seconds=time.monotonic() - t0)
        )
    config = probe_config(ctx)
    for name in names:
        overrides = RECIPES[name]
        arch = arch_of(overrides)
        for tower, kind in ((_arch_name(arch), "random"), (name, "pretrained")):
            if tower in done:
                continue
            over = dict(pipeline._pretrain_overrides(ctx), **overrides)
            over.update({f"evals.{e}.log_steps": None for e in ("val", "zeroshot", "colour_swap")})
            if kind == "random":
                over.update(total_steps=0, ckpt_steps=1, evals={})
            t0 = time.monotonic()
            spec = f"configs/cappa_tiny.py:tokenizer={ctx.tokenizer}"
            result = pipeline.run_training(ctx, f"towers/{tower}", spec, over)
            seconds = time.monotonic() - t0
            report = fewshot_report.probe(
                ctx.path("towers", tower, "run"), config, ctx.path("towers", tower, "fewshot")
            )
            final = result["final"]
            keep(
                dict(
                    name=tower,
                    kind=kind,
                    overrides=over if kind == "random" else overrides,
                    train_seconds=round(seconds, 1),
                    probe=summarise(report),
                    loss=final.get("train/loss"),
                    val_perplexity=final.get("val/perplexity"),
                    zeroshot=final.get("zeroshot/prec@1"),
                )
            )
    write_table(ctx.path("sweep.md"), list(done.values()))
    return rows


def write_table(path: str, rows: list[dict]) -> None:
    head = ["tower", "train s", "loss"] + [f"{d} {k}" for d in DATASETS for k in SHOTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], f"{row.get('train_seconds', 0):.0f}", f"{row.get('loss') or 0:.3f}"]
        for d in DATASETS:
            for k in SHOTS:
                r = row["probe"].get(d, {})
                cells.append(
                    f"{100 * r[str(k)]:.1f} ± {100 * r[f'{k}_std']:.1f}" if str(k) in r else ""
                )
        lines.append("| " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/sweep")
    parser.add_argument(
        "--recipes", default="base", help=f"comma-separated names of {list(RECIPES)}"
    )
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {list(RECIPES)}")
    run(args.workdir, names, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

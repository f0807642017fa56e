"""`cappa probe`: few-shot linear probes of a trained tower on several datasets, written up as a report.

    cappa probe --checkpoint WORKDIR --config configs/fewshot.py [--out DIR] [--config.shots="(1, 10)"]
    cappa probe --checkpoint vit.npz --model "{'variant': 'B/16', 'pool_type': 'map'}" --config ...

Loads the image tower (pretrain/features.py), extracts the train and test features of every dataset (cached under
`cache_dir`, so a second run with the same tower, data, pp, layer and pooling reads them from disk), runs the
protocol of tasks/fewshot.py and writes to --out (default WORKDIR/fewshot, or `<file>.fewshot` next to an .npz):

* `fewshot.md`: accuracy (%) per dataset and shot count, mean +- std over seeds, then every seed with its l2;
* `fewshot.json`: all numbers and the protocol record (checkpoint, its digest and step, layer, pooling,
  resolution, shots, seeds, l2 grid, chosen l2s, splits and their sizes, pp strings, feature dimension);
* `fewshot.png`: accuracy vs shots, one line per dataset, error bars = std over seeds.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from tasks import fewshot
from transfer import config as config_lib

REPORT_FILES = ("fewshot.md", "fewshot.json", "fewshot.png")


# ---------------------------------------------------------------------------------------------- config
def load_config(path: str, overrides: Mapping[str, Any]) -> Any:
    """The probe config of `path[:arg]`, completed with `fewshot.PROBE_DEFAULTS`, overrides applied."""
    import ml_collections

    defaults = dict(fewshot.PROBE_DEFAULTS)
    user = config_lib.load_config_file(path).to_dict()
    unknown = sorted(set(user) - set(defaults))
    if unknown:
        closest = (difflib.get_close_matches(unknown[0], list(defaults), n=1, cutoff=0.0) or [""])[
            0
        ]
        raise config_lib.ConfigError(
            f"Unknown probe config key '{unknown[0]}'. Did you mean '{closest}'? (Keys: {sorted(defaults)}.)"
        )
    config = ml_collections.ConfigDict({**defaults, **user})
    config_lib.apply_overrides(config, overrides)
    return config


def _out_dir(checkpoint: str, out: str | None) -> str:
    if out:
        return out
    if os.path.isdir(checkpoint):
        return os.path.join(checkpoint, "fewshot")
    return os.path.splitext(checkpoint)[0] + ".fewshot"


def _resolution(config: Any, tower: Any) -> int:
    if config.resolution:
        return int(config.resolution)
    from pretrain import runs

    run_config = None
    if os.path.isdir(tower.source):  # A tower without learnt positions: the run's last resize(N).
        run_config = runs.read_config(tower.source)
    try:
        return runs.image_size({"img": tower.params}, run_config)
    except config_lib.InputError:
        raise config_lib.ConfigError(
            "cannot tell the tower's resolution (no square learnt position embedding, no resize(N) in the "
            "run's input.pp): set --config.resolution=224 (or the size it was trained at)."
        ) from None


# ---------------------------------------------------------------------------------------------- probing
def probe_dataset(
    tower: Any, name: str, spec: Mapping[str, Any], config: Any, resolution: int, cache_dir: str
) -> dict[str, Any]:
    """One dataset: features of both splits (cached), then the protocol. JSON-able."""
    from pretrain import features

    pp = fewshot.resolve_pp(spec["pp"], resolution)
    sets = {}
    for which in ("train", "test"):
        sets[which] = features.extract(
            tower,
            fewshot.split_data(spec, which),
            pp=pp,
            layer=config.layer,
            pooling=config.pooling,
            batch_size=int(config.batch_size),
            label_key=spec["label_key"],
            cache_dir=cache_dir,
        )
        state = "read from the cache" if sets[which].cached else "extracted"
        print(f"{name}: {which} features {sets[which].features.shape} {state}", flush=True)
    result = fewshot.run_protocol(
        (sets["train"].features, sets["train"].labels),
        (sets["test"].features, sets["test"].labels),
        shots=list(config.shots),
        seeds=list(config.seeds),
        l2_grid=list(config.l2_grid),
        holdout_per_class=int(config.holdout_per_class),
        short_classes=config.short_classes,
    )
    return dict(
        tfds_name=spec["name"],
        train_split=spec["train_split"],
        test_split=spec["test_split"],
        data_dir=spec.get("data_dir"),
        label_key=spec["label_key"],
        pp=pp,
        feature_cache={w: dict(key=s.key, cached=s.cached) for w, s in sets.items()},
        **result,
    )


def probe(
    checkpoint: str, config: Any, out: str, *, step: int | None = None, **tower_kw: Any
) -> dict:
    """Loads the tower, probes every dataset of `config`, returns the report (see write_report)."""
    from pretrain import features

    if config.pooling == "none":
        raise config_lib.ConfigError(
            "pooling='none' gives all tokens; a few-shot probe needs one vector per image."
        )
    specs = fewshot.dataset_specs(dict(config.datasets))
    tower = features.load_tower(checkpoint, step=step, **tower_kw)
    resolution = _resolution(config, tower)
    cache_dir = config.cache_dir or os.path.join(out, "cache")
    protocol = dict(
        checkpoint=tower.source,
        digest=tower.digest,
        step=tower.step,
        layer=config.layer,
        pooling=config.pooling,
        resolution=resolution,
        shots=[int(k) for k in config.shots],
        seeds=[int(s) for s in config.seeds],
        l2_grid=[float(v) for v in config.l2_grid],
        holdout_per_class=int(config.holdout_per_class),
        short_classes=config.short_classes,
        l2_selection="best held-out TRAIN accuracy (ties: larger l2); the test split is only scored",
        std="sample std over seeds (ddof=1)",
    )
    results = {}
    for name, spec in specs.items():
        results[name] = probe_dataset(tower, name, spec, config, resolution, cache_dir)
    return dict(protocol=protocol, datasets=results)


# ---------------------------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The summary table (dataset x shots, mean +- std in %), the per-seed table and the splits."""
    p, datasets = report["protocol"], report["datasets"]
    shots = [str(k) for k in p["shots"]]
    grid = p["l2_grid"]
    lines = [
        "# Few-shot linear probes",
        "",
        f"Checkpoint `{p['checkpoint']}` (step {p['step']}, sha256 `{p['digest'][:16]}`), layer `{p['layer']}`, "
        f"pooling `{p['pooling']}`, resolution {p['resolution']}. Seeds {p['seeds']}; l2 chosen per (shots, seed) "
        f"on {p['holdout_per_class']} held-out train examples per class from {len(grid)} values in "
        f"[{min(grid):g}, {max(grid):g}]. Accuracy in %, mean +- std over seeds.",
        "",
        "| dataset | " + " | ".join(f"{k}-shot" for k in shots) + " |",
        "|---|" + "---:|" * len(shots),
    ]
    for name, d in datasets.items():
        cells = [f"{_pct(d['shots'][k]['mean'])} ± {_pct(d['shots'][k]['std'])}" for k in shots]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per seed",
        "",
        "| dataset | shots | seed | accuracy | l2 | shot examples | held-out examples |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, d in datasets.items():
        for k in shots:
            for r in d["shots"][k]["per_seed"]:
                lines.append(
                    f"| {name} | {k} | {r['seed']} | {_pct(r['accuracy'])} | {r['l2']:g} | "
                    f"{r['num_shots']} | {r['num_holdout']} |"
                )
    lines += [
        "",
        "## Data",
        "",
        "| dataset | TFDS name | train split | test split | classes | feature dim | pp |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for name, d in datasets.items():
        lines.append(
            f"| {name} | {d['tfds_name']} | {d['train_split']} ({d['train_size']}) | "
            f"{d['test_split']} ({d['test_size']}) | {d['num_classes']} | {d['feature_dim']} | `{d['pp']}` |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: str) -> None:
    """Accuracy (%) vs shots (log axis), one line per dataset, std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [int(k) for k in report["protocol"]["shots"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, d in report["datasets"].items():
        means = [100 * d["shots"][str(k)]["mean"] for k in shots]
        stds = [100 * d["shots"][str(k)]["std"] for k in shots]
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"few-shot linear probes ({report['protocol']['pooling']}, layer {report['protocol']['layer']})"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: Mapping[str, Any], out_dir: str) -> list[str]:
    """Writes fewshot.md, fewshot.json and fewshot.png into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in REPORT_FILES]
    with open(paths[0], "w") as f:
        f.write(markdown(report))
    with open(paths[1], "w") as f:
        json.dump(report, f, indent=1)
    plot(report, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cappa probe", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="a `cappa train` workdir, or a big_vision ViT .npz"
    )
    p.add_argument(
        "--config", required=True, help="configs/fewshot.py[:arg]; override with --config.x=v"
    )
    p.add_argument(
        "--out", default=None, help="report directory (default WORKDIR/fewshot or <npz>.fewshot)"
    )
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)"
    )
    p.add_argument("--model", default=None, help="ViT config of an .npz, a dict literal")
    p.add_argument(
        "--npz_prefix", default="", help="sub-tree of the .npz holding the tower, e.g. img"
    )
    return p


def _model_arg(text: str | None) -> dict | None:
    """--model: a ViT config as a dict literal, or None."""
    if not text:
        return None
    try:
        model = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        model = None
    if not isinstance(model, dict):
        raise config_lib.InputError(
            f"--model must be a dict literal such as \"{{'variant': 'B/16'}}\", got {text!r}"
        )
    return model


def main(argv: list[str]) -> int:
    """Entry point of `cappa probe`; returns the exit code (2 = bad input, message on stderr)."""
    try:
        argv, overrides = config_lib.split_cli_overrides(argv)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    try:
        model = _model_arg(args.model)
        config = load_config(args.config, overrides)
        out = _out_dir(args.checkpoint, args.out)
        report = probe(
            args.checkpoint, config, out, step=args.step, model=model, npz_prefix=args.npz_prefix
        )
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        paths = write_report(report, out)
        print(markdown(report).split("\n## ")[0].rstrip())
        print(f"\nreport: {', '.join(paths)}")
    return 0

"""Few-shot probe time: the whole protocol of tasks/fewshot.py on synthetic features at ImageNet scale.

    .venv/bin/python benchmarks/fewshot.py [--quick]

Prints one JSON object. Full size: 1,000 classes, D = 1,024, 50,000 test examples, a train pool of
(25 shots + 10 held-out) x 1,000 = 35,000 examples; shots 1, 5, 10, 25 x 3 seeds x 23 l2 values (2^-6 .. 2^16).
Every (shots, seed) costs one eigh (of X X^T for 1 shot: N = 1,000 < D; of X^T X otherwise), the held-out
accuracy of all 23 l2 values (10,000 examples) and the test accuracy of the chosen one (50,000 examples).
Features are Gaussian class centres plus noise, so the accuracies are meaningful but not a property of a model.
Times include compilation (once per shot count: the shapes change); feature extraction is benchmarked apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks import fewshot  # noqa: E402

SIZES = {
    # centre_std: class separation, set so that 1-shot accuracy is well below 100%.
    "full": dict(classes=1_000, dim=1_024, test=50_000, centre_std=0.3),
    "quick": dict(classes=100, dim=256, test=5_000, centre_std=0.4),
}
SHOTS = (1, 5, 10, 25)
SEEDS = (0, 1, 2)
HOLDOUT = 10
L2_GRID = fewshot.L2_GRID


def synthetic(
    classes: int, dim: int, per_class: int, seed: int, centre_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Class centres N(0, centre_std^2 I) plus unit noise, float32; labels in a random order."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0.0, centre_std, (classes, dim)).astype(np.float32)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    x = rng.standard_normal((len(labels), dim), dtype=np.float32)
    x += centres[labels]
    return x, labels


def benchmark(quick: bool) -> dict:
    size = SIZES["quick" if quick else "full"]
    shape = dict(classes=size["classes"], dim=size["dim"], centre_std=size["centre_std"])
    train = synthetic(per_class=max(SHOTS) + HOLDOUT, seed=1, **shape)
    test = synthetic(per_class=size["test"] // size["classes"], seed=2, **shape)
    kw = dict(seeds=SEEDS, l2_grid=L2_GRID, holdout_per_class=HOLDOUT)
    per_shots, total = {}, 0.0
    for k in SHOTS:
        print(f"{k} shots", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fewshot.run_protocol(train, test, shots=(k,), **kw)
        seconds = time.perf_counter() - t0
        total += seconds
        r = out["shots"][str(k)]
        per_shots[str(k)] = dict(
            seconds=round(seconds, 2),
            train_examples=r["per_seed"][0]["num_shots"],
            holdout_examples=r["per_seed"][0]["num_holdout"],
            accuracy_mean=round(r["mean"], 4),
            accuracy_std=round(r["std"], 4),
            chosen_l2=[p["l2"] for p in r["per_seed"]],
        )
    # One (25 shots, seed) in parts, compiled already: eigh, 23 held-out l2 values, one test l2.
    split = fewshot.sample_shots(
        train[1], max(SHOTS), 0, num_classes=size["classes"], holdout_per_class=HOLDOUT
    )
    parts = {}
    t0 = time.perf_counter()
    fitted = jax.block_until_ready(
        fewshot.fit(train[0][split.shots], train[1][split.shots], size["classes"])
    )
    parts["fit_eigh_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    l2, _ = fewshot.choose_l2(fitted, train[0][split.holdout], train[1][split.holdout], L2_GRID)
    parts["choose_l2_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    fewshot.accuracies(fitted, test[0], test[1], [l2])
    parts["test_s"] = round(time.perf_counter() - t0, 3)
    return {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "jax_version": jax.__version__,
            "platform": jax.devices()[0].platform,
        },
        "settings": {
            "mode": "quick" if quick else "full",
            **size,
            "train_pool": len(train[1]),
            "shots": list(SHOTS),
            "seeds": len(SEEDS),
            "l2_values": len(L2_GRID),
            "holdout_per_class": HOLDOUT,
        },
        "probe_seconds_total": round(total, 2),
        "per_shots": per_shots,
        "one_25shot_seed_warm": parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="100 classes, D=256, 5,000 test examples"
    )
    args = parser.parse_args()
    print(json.dumps(benchmark(args.quick), indent=1))


if __name__ == "__main__":
    main()

"""Few-shot linear probes of a frozen tower: the closed-form ridge classifier, the shots protocol, an evaluator.

The probe (the recipe big_vision calls `fewshot_lsr`): features are whitened with the mean and std of the
examples it is fit on (+1e-5), a constant bias feature of 100 is appended (so the bias is all but unregularised),
targets are one-hot scaled to {-1, +1}, and the weights solve ridge regression; the prediction is the argmax.

One eigendecomposition serves a whole grid of l2 values: with A the whitened design (N x D) and Y the targets,

    N >= D:  A^T A = V diag(e) V^T   ->  W(l2) = V diag(1 / (e + l2)) V^T A^T Y
    N <  D:  A A^T = U diag(e) U^T   ->  W(l2) = A^T U diag(1 / (e + l2)) U^T Y

so both are `W(l2) = Q diag(1 / (e + l2)) B`, and the logits of eval features Z are `(Z Q) diag(...) B`: `Z Q` is
computed once, each l2 costs one scaled matmul. The whitened columns have zero mean over the fit examples, so the
bias column is orthogonal to them and its weight separates exactly, `w_b = 100 * sum(Y) / (100^2 N + l2)`: it is
solved on its own instead of inside the eigh, where its 10^4-times larger eigenvalue would swamp float32's
precision for the small eigenvalues of the features.

Protocol: for each shot count k and seed s, a permutation of the train split seeded by s picks the first k
examples of every class as the shots and the next `holdout_per_class` as held-out TRAIN data. The probe is fit on
the shots, l2 is the grid value with the best held-out accuracy (ties go to the larger l2), and the same fit with
that l2 is scored on the test split. The test split never reaches `choose_l2`.

    cappa probe --checkpoint WORKDIR --config configs/fewshot.py      (the command: tasks/fewshot_report.py)
    evals.fewshot = dict(type="tasks.fewshot:Evaluator", datasets=("scenes",), log_steps=1000)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasks import fewshot_datasets as table
from transfer import config as config_lib
from transfer import contracts

BIAS_FEATURE = 100.0
STD_EPS = 1e-5
SHORT_CLASSES = ("error", "use_all")
L2_GRID = tuple(2.0**p for p in range(-6, 17))
_HIGHEST = jax.lax.Precision.HIGHEST  # TPUs multiply float32 in bfloat16 passes by default.


# ---------------------------------------------------------------------------------------------- solver
class RidgeFit(NamedTuple):
    """A probe fit on some examples, for any l2: weights(l2) = proj diag(1 / (eigvals + l2)) coef."""

    mean: jax.Array  # [D] whitening of the fit examples
    scale: jax.Array  # [D] std + STD_EPS
    proj: jax.Array  # [D, K]  (K = min(N, D))
    eigvals: jax.Array  # [K], clipped at 0
    coef: jax.Array  # [K, C]
    target_sum: jax.Array  # [C] sum of the +-1 targets (the bias weight, see _bias_weight)
    num_examples: jax.Array  # [] N


@functools.partial(jax.jit, static_argnames="num_classes")
def fit(features: jax.Array, labels: jax.Array, num_classes: int) -> RidgeFit:
    """One eigendecomposition of the fit examples (float32): the probe for every l2 at once."""
    x = jnp.asarray(features, jnp.float32)
    mean = jnp.mean(x, axis=0)
    scale = jnp.std(x, axis=0) + STD_EPS
    a = (x - mean) / scale
    y = 2.0 * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) - 1.0
    n, d = a.shape
    if n >= d:
        eigvals, v = jnp.linalg.eigh(jnp.matmul(a.T, a, precision=_HIGHEST))
        proj = v
        coef = jnp.matmul(v.T, jnp.matmul(a.T, y, precision=_HIGHEST), precision=_HIGHEST)
    else:
        eigvals, u = jnp.linalg.eigh(jnp.matmul(a, a.T, precision=_HIGHEST))
        proj = jnp.matmul(a.T, u, precision=_HIGHEST)
        coef = jnp.matmul(u.T, y, precision=_HIGHEST)
    return RidgeFit(mean, scale, proj, jnp.maximum(eigvals, 0.0), coef, y.sum(0), jnp.float32(n))


def weights(fitted: RidgeFit, l2: float) -> tuple[jax.Array, jax.Array]:
    """(W [D, C], bias feature weight [C]) of the probe with this l2 (for inspection; predict() never forms W)."""
    w = fitted.proj @ (fitted.coef / (fitted.eigvals + l2)[:, None])
    return w, _bias_weight(fitted, l2)


def _bias_weight(fitted: RidgeFit, l2: jax.Array) -> jax.Array:
    """Weight of the constant feature: it is orthogonal to the whitened ones, so it solves a 1-D ridge."""
    return BIAS_FEATURE * fitted.target_sum / (BIAS_FEATURE**2 * fitted.num_examples + l2)


@jax.jit
def predict(fitted: RidgeFit, features: jax.Array, l2s: jax.Array) -> jax.Array:
    """Predicted classes int32 [L, M] of `features` [M, D] for every l2 in `l2s` [L]."""
    z = (jnp.asarray(features, jnp.float32) - fitted.mean) / fitted.scale
    zq = jnp.matmul(z, fitted.proj, precision=_HIGHEST)  # [M, K], shared by every l2

    def one(l2):
        logits = jnp.matmul(zq / (fitted.eigvals + l2), fitted.coef, precision=_HIGHEST)
        return jnp.argmax(logits + BIAS_FEATURE * _bias_weight(fitted, l2), axis=-1)

    return jax.lax.map(one, jnp.asarray(l2s, jnp.float32))


def accuracies(fitted: RidgeFit, features: Any, labels: Any, l2s: Sequence[float]) -> np.ndarray:
    """Top-1 accuracy float64 [L] of the probe on (features, labels) for every l2."""
    predicted = np.asarray(predict(fitted, features, jnp.asarray(l2s, jnp.float32)))
    return (predicted == np.asarray(labels)[None]).mean(axis=1)


# ---------------------------------------------------------------------------------------------- protocol
@dataclasses.dataclass(frozen=True)
class ShotSplit:
    """Indices into the train split: the shots, the held-out train examples, and classes short of k shots."""

    shots: np.ndarray
    holdout: np.ndarray
    short: dict[int, int]  # class -> train examples it has (< k); only with short_classes="use_all"


def sample_shots(
    labels: np.ndarray,
    k: int,
    seed: int,
    *,
    num_classes: int,
    holdout_per_class: int,
    short_classes: str = "error",
) -> ShotSplit:
    """The first k examples of each class in the train split's permutation seeded by `seed` are the shots; the
    next `holdout_per_class` of the class are held out (a class with fewer left gives what it has).

    A class with fewer than k train examples raises ValueError (short_classes="error"), or all of its examples
    become shots and it contributes no held-out example (short_classes="use_all"; reported in `short`).
    """
    if short_classes not in SHORT_CLASSES:
        raise config_lib.ConfigError(
            f"short_classes={short_classes!r}: use one of {SHORT_CLASSES}."
        )
    if k < 1 or holdout_per_class < 0:
        raise config_lib.ConfigError(
            f"shots must be >= 1 and holdout_per_class >= 0, got {k} and {holdout_per_class}."
        )
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    by_class = order[
        np.argsort(labels[order], kind="stable")
    ]  # Classes in turn, permutation order within.
    sorted_labels = labels[by_class]
    starts = np.searchsorted(sorted_labels, np.arange(num_classes))
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    rank = np.arange(len(by_class)) - starts[sorted_labels]
    short = {int(c): int(n) for c, n in enumerate(counts) if n < k}
    if short and short_classes == "error":
        worst = dict(sorted(short.items(), key=lambda kv: kv[1])[:5])
        raise config_lib.ConfigError(
            f"{len(short)} of {num_classes} classes have fewer than {k} train examples (class: count, fewest "
            f"first: {worst}): drop {k} from `shots`, or set short_classes='use_all' to use all examples of "
            "those classes as their shots."
        )
    shots = by_class[rank < k]
    holdout = by_class[(rank >= k) & (rank < k + holdout_per_class)]
    return ShotSplit(shots, holdout, short)


def choose_l2(
    fitted: RidgeFit, holdout_x: Any, holdout_y: Any, l2_grid: Sequence[float]
) -> tuple[float, np.ndarray]:
    """(l2 with the best held-out accuracy, accuracy per l2); ties go to the larger l2 (the simpler probe)."""
    grid = [float(v) for v in l2_grid]
    if len(grid) == 1:
        return grid[0], np.full(1, np.nan)
    if len(holdout_y) == 0:
        raise config_lib.ConfigError(
            "no held-out train examples to choose l2 on (holdout_per_class=0, or the shots took every example): "
            "raise holdout_per_class, or give l2_grid a single value."
        )
    accs = accuracies(fitted, holdout_x, holdout_y, grid)
    best = max(range(len(grid)), key=lambda i: (accs[i], grid[i]))
    return grid[best], accs


def _check_protocol(shots: Sequence[int], seeds: Sequence[int], l2_grid: Sequence[float]) -> None:
    if not shots or any(int(k) < 1 for k in shots):
        raise config_lib.ConfigError(
            f"shots must be a non-empty list of counts >= 1, got {list(shots)}."
        )
    if not seeds:
        raise config_lib.ConfigError("seeds is empty: give at least one seed.")
    if not l2_grid or any(not float(v) > 0 for v in l2_grid):
        raise config_lib.ConfigError(
            f"l2_grid must be a non-empty list of values > 0, got {list(l2_grid)}."
        )


def _one_run(train: tuple, test: tuple, k: int, seed: int, **settings: Any) -> dict[str, Any]:
    """One (shots, seed): fit on the shots, choose l2 on held-out train data, then (only then) score the test."""
    (x, y), l2_grid, num_classes = train, settings.pop("l2_grid"), settings["num_classes"]
    split = sample_shots(y, k, seed, **settings)
    fitted = fit(x[split.shots], y[split.shots], num_classes)
    l2, holdout_accs = choose_l2(fitted, x[split.holdout], y[split.holdout], l2_grid)
    return dict(
        seed=seed,
        accuracy=float(accuracies(fitted, *test, [l2])[0]),
        l2=l2,
        num_shots=len(split.shots),
        num_holdout=len(split.holdout),
        holdout_accuracy=[None if np.isnan(a) else float(a) for a in holdout_accs],
        short_classes={str(c): n for c, n in split.short.items()},
    )


def run_protocol(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2_grid: Sequence[float] = L2_GRID,
    holdout_per_class: int = 10,
    short_classes: str = "error",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Few-shot accuracies of (features, labels) pairs: per shot count, mean +- std (ddof=1) over seeds, per seed
    accuracy, chosen l2 and held-out accuracies per l2. JSON-able; shot counts are string keys."""
    _check_protocol(shots, seeds, l2_grid)
    train_x, train_y = np.asarray(train[0]), np.asarray(train[1])
    test_x, test_y = np.asarray(test[0]), np.asarray(test[1])
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise config_lib.ConfigError(
            f"features must be [N, D] with one D for train and test, got {train_x.shape} and {test_x.shape} "
            "(pooling='none' gives tokens: pick a pooling that gives one vector per image)."
        )
    if min(train_y.min(initial=0), test_y.min(initial=0)) < 0:
        raise config_lib.ConfigError("labels must be >= 0.")
    largest = int(max(train_y.max(initial=0), test_y.max(initial=0)))
    num_classes = largest + 1 if num_classes is None else int(num_classes)
    if largest >= num_classes:
        raise config_lib.ConfigError(
            f"label {largest} is out of range for num_classes={num_classes}."
        )
    out: dict[str, Any] = dict(
        num_classes=num_classes,
        feature_dim=int(train_x.shape[1]),
        train_size=len(train_y),
        test_size=len(test_y),
        shots={},
    )
    settings = dict(
        num_classes=num_classes,
        l2_grid=l2_grid,
        holdout_per_class=holdout_per_class,
        short_classes=short_classes,
    )
    for k in shots:
        runs = [
            _one_run((train_x, train_y), (test_x, test_y), int(k), int(seed), **settings)
            for seed in seeds
        ]
        accs = np.array([r["accuracy"] for r in runs])
        out["shots"][str(int(k))] = dict(
            mean=float(accs.mean()),
            std=float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            per_seed=runs,
        )
    return out


# ---------------------------------------------------------------------------------------------- datasets
SPEC_KEYS = ("name", "train_split", "test_split", "pp", "label_key", "data_dir")


def dataset_specs(datasets: Any, data_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """{name: spec}: names are looked up in tasks/fewshot_datasets.py's table; a mapping's entries are merged over
    the table's entry of the same name (or must be complete). A spec without data_dir gets `data_dir`."""
    if hasattr(datasets, "to_dict"):  # a ConfigDict (evals.<name>.datasets) is not a Mapping
        datasets = datasets.to_dict()
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, Mapping):
        datasets = {name: {} for name in datasets}
    if not datasets:
        raise config_lib.ConfigError("no datasets: name at least one (e.g. datasets=('scenes',)).")
    specs = {}
    for name, given in datasets.items():
        given = dict(given or {})
        unknown = sorted(set(given) - set(SPEC_KEYS))
        if unknown:
            raise config_lib.ConfigError(
                f"dataset {name!r}: unknown keys {unknown}; valid: {list(SPEC_KEYS)}."
            )
        spec = {**table.DATASETS.get(name, {}), **given}
        missing = [k for k in SPEC_KEYS if k not in spec and k != "data_dir"]
        if missing:
            raise config_lib.ConfigError(
                f"dataset {name!r} is not in tasks/fewshot_datasets.py ({sorted(table.DATASETS)}), so it needs "
                f"all of {list(SPEC_KEYS[:-1])}; missing {missing}."
            )
        spec["data_dir"] = spec.get("data_dir") or data_dir
        specs[str(name)] = spec
    return specs


def split_data(spec: Mapping[str, Any], which: str) -> dict[str, Any]:
    """`input.data`-style dict of the spec's train or test split."""
    return dict(name=spec["name"], split=spec[f"{which}_split"], data_dir=spec.get("data_dir"))


def resolve_pp(pp: str, resolution: int) -> str:
    """The pp string with `{res}` replaced by the resolution."""
    return pp.replace("{res}", str(int(resolution)))


# ---------------------------------------------------------------------------------------------- evaluator
# The protocol's knobs, for the evaluator and for `cappa probe` (configs/fewshot.py picks the datasets).
PROTOCOL_DEFAULTS = dict(
    shots=(1, 5, 10, 25),
    seeds=(0, 1, 2),  # seed s: the first k per class of the train split's permutation seeded by s
    layer="final",  # "final" (after the last norm) or a block index (0-based, negative from the end)
    pooling="gap",  # gap | registers | tokens | cls | map | pre_logits (see pretrain/features.py)
    l2_grid=L2_GRID,  # one eigh per (shots, seed) covers them all
    holdout_per_class=10,  # held-out TRAIN examples per class that choose l2 (after the shots)
    short_classes="error",  # a class with fewer than k train examples: "error" or "use_all" (all are shots)
    resolution=None,  # None = the tower's (learnt position embedding, else the last resize(N) of input.pp)
)
EVAL_DEFAULTS = dict(
    type=None,
    datasets=("scenes",),  # names of tasks/fewshot_datasets.py's table, or {name: spec (overrides)}
    **PROTOCOL_DEFAULTS,
    batch_size=None,  # None = config.input.batch_size
    log_steps=None,
)
# `cappa probe --config configs/fewshot.py` (tasks/fewshot_report.py).
PROBE_DEFAULTS = dict(
    datasets={},  # {name: spec}: configs/fewshot.py's arg picks them from tasks/fewshot_datasets.py
    **PROTOCOL_DEFAULTS,
    batch_size=64,  # images per feature-extraction step (a multiple of the device count)
    cache_dir=None,  # features cache; None = <out>/cache
)


class Evaluator:
    """Few-shot accuracy of the live tower during training: `<dataset>/<k>shot` = mean over seeds.

    Every run extracts the train and test features of each dataset with the loop's mesh and param shardings
    (the tower changes between runs, so nothing is cached) and runs the protocol on the host.
    """

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        from pretrain import features
        from transfer import evaluators, input_pipeline, sharding

        config, param_shardings = ctx.config, ctx.param_shardings
        self.cfg = evaluators.settings(eval_cfg, EVAL_DEFAULTS, "few-shot")
        cfg = self.cfg
        _check_protocol(cfg["shots"], cfg["seeds"], cfg["l2_grid"])
        if cfg["short_classes"] not in SHORT_CLASSES:
            raise config_lib.ConfigError(
                f"short_classes={cfg['short_classes']!r}: use one of {SHORT_CLASSES}."
            )
        if "img" not in param_shardings:
            raise config_lib.ConfigError(
                "the few-shot evaluator needs a task with an image tower `img/...`."
            )
        data_dir = dict(config.input.data).get("data_dir")
        self.specs = dataset_specs(cfg["datasets"], data_dir)
        for spec in self.specs.values():  # Fail at start-up, not at the first evaluation.
            input_pipeline.get_builder(split_data(spec, "train"))
        self.batch_size = int(cfg["batch_size"] or config.input.batch_size)
        sharding.check_batch_size(
            self.batch_size, ctx.mesh, ctx.batch_axes(), "few-shot batch_size"
        )
        if cfg["pooling"] == "none":
            raise config_lib.ConfigError(
                "pooling='none' gives all tokens; a few-shot probe needs one vector per image."
            )
        fn = features.features_fn(features.vit_kwargs(config), cfg["layer"], cfg["pooling"])
        jitted = jax.jit(fn, in_shardings=(param_shardings["img"], ctx.batch_sharding))
        self._fn, self._jitted = fn, (jitted, ctx.batch_sharding)
        self._config = config

    def _resolution(self, img_params: Any) -> int:
        if self.cfg["resolution"]:
            return int(self.cfg["resolution"])
        from pretrain import runs

        return runs.image_size({"img": img_params}, self._config)

    def run(self, params: Any) -> dict[str, float]:
        from pretrain import features

        img = params["img"]
        res = self._resolution(img)
        out = {}
        for name, spec in self.specs.items():
            pp = resolve_pp(spec["pp"], res)
            train, test = (
                features.compute(
                    self._fn,
                    img,
                    split_data(spec, which),
                    pp=pp,
                    batch_size=self.batch_size,
                    label_key=spec["label_key"],
                    jitted=self._jitted,
                )
                for which in ("train", "test")
            )
            result = run_protocol(
                train,
                test,
                shots=self.cfg["shots"],
                seeds=self.cfg["seeds"],
                l2_grid=self.cfg["l2_grid"],
                holdout_per_class=int(self.cfg["holdout_per_class"]),
                short_classes=self.cfg["short_classes"],
            )
            out.update({f"{name}/{k}shot": r["mean"] for k, r in result["shots"].items()})
        return out

"""Few-shot linear probes: the closed form against numpy, the protocol's invariants, the report, the CLI and the
evaluator end to end on a tiny classify run."""

import json
import os

import jax
import numpy as np
import pytest

from tasks import fewshot, fewshot_report
from transfer import cli, contracts, metrics

L2S = [2.0**-6, 0.5, 4.0, 2.0**10]


def _reference_logits(x, y, z, num_classes, l2):
    """big_vision's recipe in float64, the bias as an appended column, solved by np.linalg.solve."""
    x, z = x.astype(np.float64), z.astype(np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-5
    bias = lambda a: np.concatenate([a, np.full((len(a), 1), 100.0)], axis=1)
    a, b = bias((x - mean) / scale), bias((z - mean) / scale)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ targets)
    return b @ w


@pytest.mark.parametrize(
    "n,d", [(120, 12), (15, 40)], ids=["N>=D (eigh of X^T X)", "N<D (eigh of X X^T)"]
)
def test_solver_matches_numpy_normal_equations(n, d):
    rng = np.random.default_rng(0)
    num_classes = 4
    x = (rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)).astype(np.float32)
    y = np.arange(n) % num_classes
    z = rng.normal(size=(40, d)).astype(np.float32)
    fitted = fewshot.fit(x, y, num_classes)
    predicted = np.asarray(fewshot.predict(fitted, z, np.asarray(L2S, np.float32)))
    for i, l2 in enumerate(L2S):
        ref = _reference_logits(x, y, z, num_classes, l2)
        w, wb = fewshot.weights(fitted, l2)
        logits = ((z - np.asarray(fitted.mean)) / np.asarray(fitted.scale)) @ np.asarray(
            w
        ) + 100 * np.asarray(wb)
        np.testing.assert_allclose(logits, ref, atol=2e-3 * np.abs(ref).max())
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-2  # Near-ties may flip in float32.
        np.testing.assert_array_equal(predicted[i][clear], ref.argmax(1)[clear])


def _blobs(rng, n, num_classes, d, noise):
    """One-hot labels in the first dims plus Gaussian noise on all d dims."""
    y = np.arange(n) % num_classes
    x = noise * rng.normal(size=(n, d))
    x[:, :num_classes] += np.eye(num_classes)[y]
    return x.astype(np.float32), y


def test_features_that_encode_the_label_give_100_percent():
    rng = np.random.default_rng(1)
    train, test = _blobs(rng, 300, 10, 10, 0.02), _blobs(rng, 200, 10, 10, 0.02)
    out = fewshot.run_protocol(train, test, shots=(1, 5), seeds=(0, 1), holdout_per_class=3)
    sizes = (out["num_classes"], out["feature_dim"], out["train_size"], out["test_size"])
    assert sizes == (10, 10, 300, 200)
    for k in ("1", "5"):
        assert out["shots"][k]["mean"] == 1.0 and out["shots"][k]["std"] == 0.0
        assert [r["accuracy"] for r in out["shots"][k]["per_seed"]] == [1.0, 1.0]


def test_random_features_give_about_chance():
    rng = np.random.default_rng(2)
    train = (rng.normal(size=(400, 32)).astype(np.float32), np.arange(400) % 10)
    test = (rng.normal(size=(3000, 32)).astype(np.float32), np.arange(3000) % 10)
    out = fewshot.run_protocol(train, test, shots=(1, 10), seeds=(0, 1, 2))
    for k in ("1", "10"):
        assert 0.06 < out["shots"][k]["mean"] < 0.14  # chance: 0.10
        accs = [r["accuracy"] for r in out["shots"][k]["per_seed"]]
        assert out["shots"][k]["std"] == pytest.approx(np.std(accs, ddof=1))


def _chosen(out):
    return {k: [r["l2"] for r in v["per_seed"]] for k, v in out["shots"].items()}


def test_l2_choice_never_sees_the_test_split():
    rng = np.random.default_rng(3)
    train, test = _blobs(rng, 400, 8, 16, 0.7), _blobs(rng, 400, 8, 16, 0.7)
    grid = [2.0**p for p in range(-6, 17)]
    kw = dict(shots=(2, 5), seeds=(0, 1, 2), holdout_per_class=6, l2_grid=grid)
    out = fewshot.run_protocol(train, test, **kw)
    garbage = (rng.normal(size=(37, 16)).astype(np.float32) * 1e3, rng.integers(0, 8, 37))
    assert _chosen(fewshot.run_protocol(train, garbage, **kw, num_classes=8)) == _chosen(out)
    # Poison: test labels = the predictions of an l2 that held-out train data did not pick, so a choice on
    # the test split would pick that l2 and score 100%.
    split = fewshot.sample_shots(train[1], 5, 0, num_classes=8, holdout_per_class=6)
    fitted = fewshot.fit(train[0][split.shots], train[1][split.shots], 8)
    predictions = np.asarray(fewshot.predict(fitted, test[0], np.asarray(grid, np.float32)))
    at_chosen = predictions[grid.index(out["shots"]["5"]["per_seed"][0]["l2"])]
    other = next(i for i, p in enumerate(predictions) if (p != at_chosen).any())
    poisoned = fewshot.run_protocol(train, (test[0], predictions[other]), **kw)
    assert _chosen(poisoned) == _chosen(out)
    assert poisoned["shots"]["5"]["per_seed"][0]["accuracy"] < 1.0


def test_shot_sampling():
    labels = np.repeat(np.arange(5), [9, 12, 20, 7, 30])
    np.random.default_rng(0).shuffle(labels)
    split = lambda k, seed, h=4: fewshot.sample_shots(
        labels, k, seed, num_classes=5, holdout_per_class=h
    )
    s = split(5, 0)
    assert np.bincount(labels[s.shots], minlength=5).tolist() == [5] * 5
    assert np.bincount(labels[s.holdout], minlength=5).tolist() == [
        4,
        4,
        4,
        2,
        4,
    ]  # class 3: 7 - 5 left
    assert not set(s.shots) & set(s.holdout)
    assert np.array_equal(split(5, 0).shots, s.shots) and np.array_equal(
        split(5, 0).holdout, s.holdout
    )
    assert set(split(5, 1).shots) != set(s.shots)
    assert set(split(1, 0).shots) <= set(s.shots)  # The first k of one permutation: nested shots.
    with pytest.raises(
        ValueError, match=r"1 of 5 classes have fewer than 8 train examples.*\{3: 7\}"
    ):
        split(8, 0)
    s = fewshot.sample_shots(
        labels, 8, 0, num_classes=5, holdout_per_class=4, short_classes="use_all"
    )
    assert np.bincount(labels[s.shots], minlength=5).tolist() == [8, 8, 8, 7, 8] and s.short == {
        3: 7
    }
    with pytest.raises(ValueError, match="no held-out train examples"):
        fewshot.run_protocol(
            (labels[:, None] * 1.0, labels), (labels[:, None] * 1.0, labels), holdout_per_class=0
        )


def _synthetic_report():
    rng = np.random.default_rng(4)
    result = fewshot.run_protocol(
        _blobs(rng, 200, 5, 8, 1.0),
        _blobs(rng, 100, 5, 8, 1.0),
        shots=(1, 3),
        seeds=(0, 1),
        holdout_per_class=5,
    )
    dataset = dict(tfds_name="blobs", train_split="train", test_split="test", pp="decode", **result)
    protocol = dict(
        checkpoint="ckpt",
        digest="ab" * 32,
        step=7,
        layer="final",
        pooling="gap",
        resolution=32,
        shots=[1, 3],
        seeds=[0, 1],
        l2_grid=fewshot.L2_GRID,
        holdout_per_class=5,
    )
    return dict(protocol=protocol, datasets={"blobs": dataset})


def test_report_files_hold_the_numbers(tmp_path):
    report = _synthetic_report()
    paths = fewshot_report.write_report(report, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == list(fewshot_report.REPORT_FILES)
    back = json.load(open(paths[1]))
    assert back["datasets"]["blobs"]["shots"] == report["datasets"]["blobs"]["shots"]
    md = open(paths[0]).read()
    for k in ("1", "3"):
        r = report["datasets"]["blobs"]["shots"][k]
        assert f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" in md
        for run in r["per_seed"]:
            assert (
                f"| blobs | {k} | {run['seed']} | {100 * run['accuracy']:.2f} | {run['l2']:g} |"
                in md
            )
    assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


_NO_CONTEXT = contracts.EvalContext(
    config=None, task=None, mesh=None, batch_sharding=None, param_shardings={}
)


def test_bad_configs_fail_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Unknown keys \['shot'\] for a 'few-shot' evaluator"):
        fewshot.Evaluator({"shot": 5}, _NO_CONTEXT)
    with pytest.raises(ValueError, match="unknown keys \\['split'\\]"):
        fewshot.dataset_specs({"scenes": {"split": "train"}})
    with pytest.raises(ValueError, match="needs all of"):
        fewshot.dataset_specs(["not_a_dataset"])
    ckpt = str(tmp_path)
    assert (
        cli.main(
            ["probe", "--checkpoint", ckpt, "--config", "configs/fewshot.py", "--config.shot=3"]
        )
        == 2
    )
    assert "Did you mean 'shots'" in capsys.readouterr().err


def test_config_args_select_datasets():
    load = lambda arg: fewshot_report.load_config("configs/fewshot.py" + arg, {"shots": (1, 10)})
    assert sorted(load("").datasets) == ["digits", "scenes"] and load("").shots == (1, 10)
    assert len(load(":big_vision").datasets) == 7
    picked = load(":uc_merced,scenes,data_dir=/data")
    assert sorted(picked.datasets) == ["scenes", "uc_merced"]
    uc = picked.datasets.uc_merced
    assert (uc.train_split, uc.test_split, uc.data_dir) == ("train[:1000]", "train[1000:]", "/data")
    with pytest.raises(ValueError, match="unknown config arg 'mnist'"):
        load(":mnist")


# ---------------------------------------------------------------------------------------------- end to end
FEWSHOT_EVAL = dict(
    type="tasks.fewshot:Evaluator", datasets=("digits",), shots=(1, 5), seeds=(0, 1), batch_size=64
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """A tiny classifier trained for 2 steps on 8 devices, with the few-shot evaluator at the end."""
    from transfer import config as config_lib
    from transfer import train

    config, _ = train.prepare_config(
        config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "tiny_config.py"))
    )
    config_lib.apply_overrides(
        config,
        {"input.data.data_dir": data_dir, "total_steps": 2, "ckpt_steps": 2, "log_flops": False},
    )
    config.evals = {"fewshot": FEWSHOT_EVAL}
    workdir = str(tmp_path_factory.mktemp("fewshot_run"))
    train.train(config, workdir)
    return workdir


def test_cli_report_matches_the_live_evaluator_and_reuses_the_cache(tiny_run, data_dir, tmp_path):
    last = metrics.read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))[-1]
    argv = [
        "probe",
        "--checkpoint",
        tiny_run,
        "--config",
        f"configs/fewshot.py:digits,data_dir={data_dir}",
        "--config.shots=(1, 5)",
        "--config.seeds=(0, 1)",
        f"--config.cache_dir={tmp_path / 'cache'}",
    ]
    assert cli.main(argv) == 0
    report = json.load(open(os.path.join(tiny_run, "fewshot", "fewshot.json")))
    p, d = report["protocol"], report["datasets"]["digits"]
    assert (p["step"], p["resolution"], p["shots"], p["seeds"]) == (2, 32, [1, 5], [0, 1])
    assert len(p["digest"]) == 64 and p["checkpoint"] == os.path.abspath(tiny_run)
    assert (d["train_size"], d["test_size"], d["num_classes"], d["feature_dim"]) == (
        1297,
        500,
        10,
        32,
    )
    assert "resize(32)" in d["pp"] and not any(c["cached"] for c in d["feature_cache"].values())
    for k in ("1", "5"):  # Cached features (data-parallel) vs live sharded params in the loop.
        assert d["shots"][k]["mean"] == pytest.approx(last[f"fewshot/digits/{k}shot"], abs=2 / 500)
        assert [len(r["holdout_accuracy"]) for r in d["shots"][k]["per_seed"]] == [23, 23]
    assert cli.main(argv) == 0
    again = json.load(open(os.path.join(tiny_run, "fewshot", "fewshot.json")))["datasets"]["digits"]
    assert all(c["cached"] for c in again["feature_cache"].values())
    assert again["shots"] == d["shots"]


def test_evaluator_needs_an_image_tower():
    with pytest.raises(ValueError, match="image tower"):
        fewshot.Evaluator(FEWSHOT_EVAL, _NO_CONTEXT)
    assert (
        jax.device_count() == 8
    )  # The end-to-end run above is sharded over the conftest's 8 devices.


def test_dataset_overrides_from_a_configdict_are_kept():
    """evals.<name>.datasets arrives as a ConfigDict: its per-dataset overrides must not be dropped."""
    import ml_collections

    given = ml_collections.ConfigDict({"scenes": {"name": "scenes/tiny"}})
    specs = fewshot.dataset_specs(given)
    assert specs["scenes"]["name"] == "scenes/tiny" and specs["scenes"]["test_split"] == "test"

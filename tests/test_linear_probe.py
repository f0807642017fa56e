"""Trained linear / MAP probes: masked MAP pooling, independent heads of the wd sweep, the probe evaluator against
numpy with the wd chosen on validation data only, cached == live training through the loop, and the report."""

import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from pretrain import features, vit
from tasks import linear_probe, probe_eval
from transfer import config as config_lib
from transfer import contracts, input_pipeline, metrics, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PP = "decode|resize(32)|value_range(-1, 1)|keep('image', 'label')"
TOWER = dict(
    width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8
)  # tests/tiny_config.py's model.


def _config(**overrides) -> ml_collections.ConfigDict:
    """A merged probe config (live mode on scenes/tiny unless `input` says otherwise)."""
    base = dict(
        task="tasks.linear_probe",
        num_classes=42,
        wd_sweep=(0.0, 0.1, 1.0),
        model=TOWER,
        map_head=dict(num_heads=2),
        input=dict(data=dict(name="scenes/tiny", split="train"), batch_size=16, pp=PP),
        schedule=[("img/.*", None), (".*", dict(decay_type="cosine"))],
        log_flops=False,
    )
    base.update(overrides)
    return train.prepare_config(ml_collections.ConfigDict(base))[0]


# ---------------------------------------------------------------------------------------------- MAP head mask
def test_map_head_ignores_masked_tokens():
    head = vit.MAPHead(num_heads=2, mlp_dim=16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    padded = np.concatenate([x, 10 * rng.normal(size=(3, 4, 8)).astype(np.float32)], axis=1)
    params = jax.jit(head.init)(jax.random.key(2), x)
    with_mask = jax.eval_shape(head.init, jax.random.key(2), padded, padded[..., 0] > 0)
    assert jax.tree.structure(params) == jax.tree.structure(with_mask)  # Same parameters.
    apply = jax.jit(head.apply)
    want = apply(params, x)
    mask = np.arange(9)[None].repeat(3, 0) < 5
    np.testing.assert_allclose(apply(params, padded, mask), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(apply(params, padded), want, atol=1e-3)  # Unmasked, the garbage counts.
    # Per-example lengths: example i keeps its first 2 + i tokens.
    got = apply(params, padded, np.arange(9)[None] < (2 + np.arange(3))[:, None])
    for i in range(3):
        np.testing.assert_allclose(got[i], apply(params, x[i : i + 1, : 2 + i])[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------- sweep
def _train_steps(task, params, batch, steps=4):
    tx = optax.sgd(
        0.5
    )  # Adam would turn the round-off in the (exactly zero) key-bias gradients into steps.
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        grads = jax.grad(lambda p: task.loss_fn(p, batch, jax.random.key(0))[0])(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    for _ in range(steps):
        params, opt = step(params, opt)
    return params


@pytest.mark.parametrize("head", ["linear", "map"])
def test_sweep_heads_train_like_each_head_alone(head):
    rng = np.random.default_rng(0)
    shape = (16, 6, 8) if head == "map" else (16, 8)
    batch = {"features": rng.normal(size=shape).astype(np.float32), "label": rng.integers(0, 5, 16)}
    if head == "map":
        batch["features_mask"] = np.arange(6)[None] < rng.integers(2, 7, (16, 1))
    wds = (0.0, 1.0)
    task = linear_probe.Task(_config(head=head, num_classes=5, wd_sweep=wds))
    init = jax.jit(task.init_params)(jax.random.key(1), batch)
    assert set(init) == {"head"} and init["head"]["classifier"]["kernel"].shape == (2, shape[-1], 5)
    together = _train_steps(task, init, batch)["head"]
    for i, wd in enumerate(wds):
        alone_task = linear_probe.Task(_config(head=head, num_classes=5, wd_sweep=(wd,)))
        start = {"head": jax.tree.map(lambda a, i=i: a[i : i + 1], init["head"])}
        alone = _train_steps(alone_task, start, batch)["head"]
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i : i + 1], b, rtol=2e-5, atol=1e-6),
            together,
            alone,
        )
    kernels = together["classifier"]["kernel"]
    assert np.linalg.norm(kernels[0]) > np.linalg.norm(kernels[1]) * 1.05  # The L2 term did act.


def test_config_guards():
    with pytest.raises(config_lib.ConfigError, match="grad_clip_norm"):
        linear_probe.Task(_config(grad_clip_norm=1.0))
    with pytest.raises(config_lib.ConfigError, match="config.wd = 0"):
        linear_probe.Task(_config(wd=1e-4))
    with pytest.raises(config_lib.ConfigError, match="optax_name"):
        linear_probe.Task(_config(optax_name="adafactor"))
    with pytest.raises(config_lib.ConfigError, match="repeats"):
        linear_probe.Task(_config(wd_sweep=(0.0, 0.0)))
    image = {"image": np.zeros((2, 32, 32, 3), np.float32), "label": np.zeros(2, np.int64)}
    task = linear_probe.Task(_config(schedule=dict(decay_type="cosine")))
    with pytest.raises(config_lib.ConfigError, match="tower frozen"):
        jax.eval_shape(task.init_params, jax.random.key(0), image)
    task = linear_probe.Task(_config(head="map"))
    with pytest.raises(ValueError, match="pooling='none'"):
        jax.eval_shape(task.init_params, jax.random.key(0), image)
    task = linear_probe.Task(_config(model_init="some/run"))
    with pytest.raises(config_lib.ConfigError, match="input.data.checkpoint"):
        task.init_params(jax.random.key(0), {"features": np.zeros((2, 8), np.float32)})


@pytest.mark.parametrize(
    "arg", [None, "head=map,cached=False", "cached,checkpoint=w", "head=map,dataset=digits"]
)
def test_shipped_config_loads(arg):
    spec = os.path.join(ROOT, "configs", "linear_probe.py") + (f":{arg}" if arg else "")
    config, module = train.prepare_config(config_lib.load_config_file(spec))
    task = module.Task(config)
    assert config.grad_clip_norm is None and config.schedule[0] == ("img/.*", None)
    assert (
        config.evals.probe.val.split == "train[90%:]" and config.input.data.split == "train[:90%]"
    )
    assert (config.features.pooling == "none") == (config.head == "map")
    assert bool(config.input.data.get("source")) == ("cached=False" not in (arg or ""))
    assert task.wd_sweep


# ---------------------------------------------------------------------------------------------- evaluator
class _FixedLogits:
    """A task stand-in whose heads output the batch's own `logits` [S, B, C]."""

    label_key = "label"

    def head_logits(self, params, batch):
        return batch["logits"]


def _balanced_accuracy(pred, labels):
    return np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)])


def test_counts_and_summary_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 12, 7)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 6, 6, 0])
    logits[0, :6, 0] += 5  # Head 0 is right on most of class 0 only: balanced < plain accuracy.
    mask = np.array([1.0] * 10 + [0.0] * 2)  # The last two rows are padding.
    sums = jax.jit(lambda b: probe_eval.probe_sums(_FixedLogits(), None, b))
    test = jax.device_get(sums({"logits": logits, "label": labels, "_mask": mask}))
    val = {"count": 4.0, "correct1": np.array([3.0, 3.0])}  # A tie: the first head wins.
    assert probe_eval.select_head(val) == 0
    out = probe_eval.summarize(val, test, (0.0, 0.5), 0)
    real_logits, real = logits[0, :10], labels[:10]
    pred = real_logits.argmax(-1)
    top5 = np.argsort(-real_logits, -1)[:, :5]
    assert out["prec@1"] == pytest.approx(np.mean(pred == real))
    assert out["prec@5"] == pytest.approx(np.mean((top5 == real[:, None]).any(-1)))
    assert out["balanced_accuracy"] == pytest.approx(_balanced_accuracy(pred, real))
    assert out["balanced_accuracy"] != pytest.approx(out["prec@1"])
    assert out["test_examples"] == 10 and out["wd"] == 0.0 and out["val_prec@1/wd=0.5"] == 0.75


@pytest.fixture(scope="module")
def live_probe(data_dir):
    """A live-mode task with a random tiny tower on scenes/tiny, its params and the loop's shardings."""
    config = _config()
    config.input.data.data_dir = data_dir
    task = linear_probe.Task(config)
    params = jax.jit(task.init_params)(
        jax.random.key(0), {"image": np.zeros((1, 32, 32, 3), np.float32)}
    )
    mesh = sharding.make_mesh(config.mesh)
    batch_sh = sharding.batch_sharding(mesh, sharding.batch_axes(mesh))
    return config, task, params, mesh, batch_sh


def _split_features(task, params, data_dir, split):
    data = {"name": "scenes/tiny", "split": split, "data_dir": data_dir}
    batches = list(input_pipeline.eval_batches({"data": data, "pp": PP}, batch_size=16))
    keep = np.concatenate([b["_mask"] > 0 for b in batches])
    fn = jax.jit(task.tower_features)
    feats = np.concatenate([fn(params["img"], b["image"]) for b in batches])
    return feats[keep].astype(np.float64), np.concatenate([b["label"] for b in batches])[keep]


def test_probe_evaluator_chooses_on_val_only(live_probe, data_dir):
    """Head h interpolates split h (val, validation, test): poisoning the test split never moves the choice."""
    config, task, params, mesh, batch_sh = live_probe
    splits = ("train[:16]", "validation", "test")
    data = [_split_features(task, params, data_dir, s) for s in splits]
    kernels = [np.linalg.pinv(f) @ (10 * np.eye(42)[y]) for f, y in data]
    for (f, y), w in zip(data, kernels, strict=True):
        assert np.mean((f @ w).argmax(-1) == y) == 1.0  # Each head is perfect on its own split.
    params = dict(
        params,
        head={
            "classifier": {
                "kernel": np.stack(kernels).astype(np.float32),
                "bias": np.zeros((3, 42), np.float32),
            }
        },
    )
    param_sh = sharding.tree_shardings(jax.eval_shape(lambda: params), mesh, config)
    params = jax.device_put(params, param_sh)
    for test_index in (1, 2):  # Test = the split head 1 (then head 2) is perfect on.
        eval_cfg = dict(
            type="probe", val=dict(split=splits[0]), test=dict(split=splits[test_index])
        )
        with jax.set_mesh(mesh):
            ctx = contracts.EvalContext(config, task, mesh, batch_sh, param_sh)
            evaluator = probe_eval.ProbeEvaluator(eval_cfg, ctx)
            out = evaluator.run(params)
        assert out["wd_index"] == 0 and out["wd"] == 0.0 and out["val_prec@1"] == 1.0
        f, y = data[test_index]
        logits = f @ kernels[0]
        pred, top5 = logits.argmax(-1), np.argsort(-logits, -1)[:, :5]
        assert out["prec@1"] == pytest.approx(np.mean(pred == y)) and out["prec@1"] < 1.0
        assert out["prec@5"] == pytest.approx(np.mean((top5 == y[:, None]).any(-1)))
        assert out["balanced_accuracy"] == pytest.approx(_balanced_accuracy(pred, y))
        assert out["test_examples"] == 16 and out["val_examples"] == 16
    with pytest.raises(ValueError, match="same"):
        probe_eval.ProbeEvaluator(dict(val=dict(split="test"), test=dict(split="test")), ctx)


# ---------------------------------------------------------------------------------------------- the loop
def _run_config(data_dir, tower_run, cache_dir, cached):
    data = dict(name="scenes/tiny", split="train[:48]", data_dir=data_dir)
    if cached:
        data.update(
            source="pretrain.features:CachedSource",
            checkpoint=tower_run,
            layer="final",
            pooling="gap",
            pp=PP,
            cache_dir=cache_dir,
            batch_size=16,
        )
    return _config(
        seed=3,
        total_steps=4,
        wd_sweep=(0.0, 0.01),
        optax_name="adam",
        lr=0.01,
        input=dict(
            data=data,
            batch_size=16,
            pp="keep('features', 'label')" if cached else PP,
            shuffle_buffer_size=64,
        ),
        model_init=None if cached else tower_run,
        log_training_steps=2,
        ckpt_steps=4,
        evals=dict(
            probe=dict(type="probe", val=dict(split="train[48:]"), test=dict(split="validation"))
        ),
    )


def test_cached_probe_equals_live_probe_and_report(tiny_run, data_dir, tmp_path):
    """Same tower, split and seed: the head trained on cached features equals the one on the live tower."""
    runs = {}
    for mode in ("live", "cached"):
        config = _run_config(data_dir, tiny_run, str(tmp_path / "cache"), mode == "cached")
        workdir = str(tmp_path / mode)
        result = train.train(config, workdir)
        for name in (
            "probe.json",
            "probe.md",
        ):  # Written by the loop's finalize call: redo it here.
            os.remove(os.path.join(workdir, name))
        linear_probe.Task(config).finalize(workdir)
        runs[mode] = (config, workdir, result)
    live, cached = runs["live"][2], runs["cached"][2]
    assert set(cached.params) == {"head"} and set(live.params) == {"img", "head"}
    moved = np.abs(np.asarray(live.params["head"]["classifier"]["kernel"])).max()
    assert moved > 1e-3  # The heads trained away from their zero init.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        jax.device_get(live.params["head"]),
        jax.device_get(cached.params["head"]),
    )
    for key in ("probe/prec@1", "probe/prec@5", "probe/balanced_accuracy", "probe/wd"):
        assert live.metrics[key] == pytest.approx(cached.metrics[key], abs=1e-6), key

    digest = features.load_tower(tiny_run).digest
    for mode, (_, workdir, _) in runs.items():
        with open(os.path.join(workdir, "probe.json")) as f:
            report = json.load(f)
        last = [
            r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "probe/wd" in r
        ][-1]
        got = report["results"]["probe"]
        for key, value in last.items():
            if key.startswith("probe/") and key != "probe/seconds":
                assert got[key[len("probe/") :]] == pytest.approx(value), key
        assert got["val_split"] == "train[48:]" and got["test_split"] == "validation"
        assert got["val_examples"] == 16 and got["test_examples"] == 16
        proto = report["protocol"]
        assert proto["mode"] == mode and proto["checkpoint"] == tiny_run
        assert proto["tower_digest"] == digest  # Live: read back from the run's own checkpoint.
        assert (proto["layer"], proto["pooling"], proto["head"]) == ("final", "gap", "linear")
        assert proto["wd_sweep"] == [0.0, 0.01] and proto["train_examples"] == 48
        assert proto["image_pp"] == PP and proto["chosen_wd"] == {"probe": got["wd"]}
        with open(os.path.join(workdir, "probe.md")) as f:
            text = f.read()
        assert f"| {got['wd']:g} (chosen) | {got['val_prec@1']:.4f} |" in text and digest in text

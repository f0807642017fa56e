"""The train loop end to end on the tiny classifier: outputs, sharding, freezing, accumulation, evaluation."""

import glob
import json
import math
import os
import time

import jax
import numpy as np
import pytest
from helpers import final_params

from tasks import classify
from transfer import checkpoint, input_pipeline, metrics, train, tree
from transfer import step as step_lib
from transfer.config import apply_overrides


def _losses(workdir):
    return [
        r["train/loss"]
        for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    ]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_dir):
    """One uninterrupted single-device run that several tests compare against."""
    from transfer import config as config_lib

    config, _ = train.prepare_config(
        config_lib.load_config_file(os.path.join(os.path.dirname(__file__), "tiny_config.py"))
    )
    config.input.data.data_dir = data_dir
    workdir = str(tmp_path_factory.mktemp("baseline"))
    result = train.train(config, workdir, devices=jax.devices()[:1])
    return workdir, result, config


def test_run_outputs_and_known_first_loss(baseline):
    workdir, result, config = baseline
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["width"] == 32 and saved["task"] == "classify"
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 13))
    # The head starts at zero: uniform logits, so the first loss is exactly ln(#classes).
    assert rows[0]["train/loss"] == pytest.approx(math.log(42), abs=1e-5)
    assert np.mean([r["train/loss"] for r in rows[-3:]]) < rows[0]["train/loss"] - 0.05
    assert {"val/prec@1", "val/loss", "input/skipped", "steps_per_sec", "lr"} <= set(rows[-1])
    # lr 3e-3, 2 warmup steps, then cosine over the remaining 10 (the update of step s uses s - 1).
    expected_lr = [
        3e-3 * (s + 1) / 2 if s < 2 else 3e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10))
        for s in range(12)
    ]
    np.testing.assert_allclose([r["lr"] for r in rows], expected_lr, rtol=1e-5)
    assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
    assert result.metrics["step"] == 12


def test_sharded_fsdp_equals_single_device(baseline, tiny_config, tmp_path):
    workdir_1, result_1, _ = baseline
    tiny_config.mesh = [("data", 2), ("fsdp", 4)]
    tiny_config.fsdp_min_size = 1
    result_8 = train.train(tiny_config, str(tmp_path))
    np.testing.assert_allclose(_losses(str(tmp_path)), _losses(workdir_1), rtol=2e-5)
    flat_1, flat_8 = tree.flatten(result_1.params), tree.flatten(result_8.params)
    sharded = [p for p, x in flat_8.items() if any(s is not None for s in x.sharding.spec)]
    assert "img/embedding/kernel" in sharded and len(sharded) > 5
    for path, x in flat_1.items():
        if path.endswith("key/bias"):
            # Softmax is shift invariant, so this gradient is zero up to rounding, and Adam turns
            # rounding noise into lr-sized steps: nothing to compare.
            continue
        np.testing.assert_allclose(np.asarray(flat_8[path]), np.asarray(x), atol=2e-5, err_msg=path)


def test_frozen_tower_is_bit_identical_and_has_no_opt_state(baseline, tiny_config, tmp_path):
    """The tower is loaded from the baseline run (model_init) and frozen; the head trains anew."""
    baseline_dir, baseline_result, _ = baseline
    apply_overrides(
        tiny_config,
        {
            "schedule": [("img/.*", None), (".*", {"decay_type": "constant"})],
            "model_init": baseline_dir,
            "model_load": {"dont_load": ["head/.*"]},
        },
    )
    result = train.train(tiny_config, str(tmp_path))
    final, loaded = tree.flatten(result.params), tree.flatten(baseline_result.params)
    for path, x in loaded.items():
        if path.startswith("img/"):
            np.testing.assert_array_equal(np.asarray(final[path]), np.asarray(x), err_msg=path)
        else:
            assert not np.array_equal(np.asarray(final[path]), np.asarray(x)), path
    mngr = checkpoint.manager(str(tmp_path / "checkpoints"), read_only=True)
    opt_meta = mngr.item_metadata(12)["train"]["opt"]
    opt_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(opt_meta)[0]
    ]
    assert opt_paths and not any("img" in p for p in opt_paths)
    assert any("head" in p for p in opt_paths)


def test_frozen_step_computes_no_tower_gradient(tiny_config):
    """XLA's FLOP count of the step: freezing the tower removes its backward pass."""
    from transfer import optim

    def step_flops(schedule):
        apply_overrides(tiny_config, {"schedule": schedule})
        task = classify.Task(tiny_config)
        batch = {"image": np.zeros((16, 32, 32, 3), np.float32), "label": np.zeros((16,), np.int32)}
        params = task.init_params(jax.random.key(0), batch)
        rules = optim.resolve_rules(params, tiny_config)
        tx = optim.make_optimizer(tiny_config, rules)
        trainable, frozen = tree.partition(params, rules.is_trainable)
        state = {
            "params": trainable,
            "frozen": frozen,
            "opt": tx.init(trainable),
            "step": np.int32(0),
            "rng": jax.random.key_data(jax.random.key(0)),
            "first_bad": np.int32(-1),
        }
        repl = jax.sharding.NamedSharding(
            jax.sharding.Mesh(jax.devices()[:1], ("data",)), jax.sharding.PartitionSpec()
        )
        step = step_lib.make_train_step(task, tx, 1, repl)
        return jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"]

    full = step_flops(dict(decay_type="constant"))
    frozen = step_flops([("img/.*", None), (".*", dict(decay_type="constant"))])
    assert frozen < 0.45 * full, (frozen, full)


def test_grad_accumulation_matches_full_batch(baseline, tiny_config, tmp_path):
    workdir_1, _, _ = baseline
    tiny_config.accum_steps = 2
    tiny_config.total_steps = 4
    train.train(tiny_config, str(tmp_path), devices=jax.devices()[:1])
    np.testing.assert_allclose(_losses(str(tmp_path)), _losses(workdir_1)[:4], rtol=1e-4)


def test_mean_evaluator_matches_direct_computation(baseline, data_dir):
    workdir, result, config = baseline
    task = classify.Task(config)
    correct, total = 0, 0
    for batch in input_pipeline.eval_batches(
        {"data": {**config.input.data, "split": "validation"}, "pp": config.input.pp},
        batch_size=16,
        process_index=0,
        process_count=1,
    ):
        logits = np.asarray(task.logits(result.params, batch["image"]))
        mask = batch["_mask"].astype(bool)
        correct += int(np.sum((logits.argmax(-1) == batch["label"])[mask]))
        total += int(mask.sum())
    assert total == input_pipeline.num_examples({**config.input.data, "split": "validation"})
    last = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
    assert last["val/prec@1"] == pytest.approx(correct / total, abs=1e-6)


def test_batch_not_divisible_by_devices(tiny_config, tmp_path):
    tiny_config.input.batch_size = 12
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        train.train(tiny_config, str(tmp_path))


def test_model_init_from_big_vision_npz(baseline, tiny_config, tmp_path):
    """A FILE model_init goes through the task's loader (big_vision .npz for classify)."""
    from pretrain.bv_import import to_big_vision

    _, baseline_result, _ = baseline
    tower = jax.device_get(baseline_result.params["img"])
    npz = str(tmp_path / "vit.npz")
    np.savez(npz, **to_big_vision(tower))
    apply_overrides(
        tiny_config,
        {
            "model_init": npz,
            "total_steps": 2,
            "model_load": {"dst_subtree": "img", "dont_load": ["head/.*"]},
            "schedule": [("img/.*", None), (".*", {"decay_type": "constant"})],
        },
    )
    result = train.train(tiny_config, str(tmp_path / "run"))
    final = tree.flatten(result.params)
    for path, x in tree.flatten(tower).items():
        np.testing.assert_array_equal(np.asarray(final["img/" + path]), np.asarray(x), err_msg=path)
    apply_overrides(tiny_config, {"model_load": {"loader": None}})
    with pytest.raises(ValueError, match="model_load.loader"):
        train.train(tiny_config, str(tmp_path / "run2"))


def test_eval_split_too_small_for_the_hosts(tiny_config, monkeypatch):
    """32 hosts and 16 validation examples: fail at start-up instead of hanging in a collective."""
    from transfer import evaluators

    evaluator = object.__new__(evaluators.MeanEvaluator)
    evaluator.batch_size = 32
    monkeypatch.setattr(jax, "process_count", lambda: 32)
    data = {**tiny_config.input.data, "split": "validation"}
    with pytest.raises(ValueError, match="leaves some of the 32 hosts without examples"):
        evaluator._batches_per_host(data)


def test_zero_steps_saves_the_initial_state_and_evaluates_it(tiny_config, tmp_path):
    """total_steps = 0: checkpoint 0 holds exactly the init that setup() builds; every evaluator runs once."""
    apply_overrides(tiny_config, {"total_steps": 0})
    workdir = str(tmp_path / "zero")
    result = train.train(tiny_config, workdir, devices=jax.devices()[:1])
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert (
        [r["step"] for r in rows] == [0] and "val/prec@1" in rows[0] and "train/loss" not in rows[0]
    )
    assert result.metrics == rows[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0"]
    init = train.setup(tiny_config, str(tmp_path / "fresh"), devices=jax.devices()[:1])
    expected = tree.flatten(tree.merge(init.state["params"], init.state["frozen"]))
    init.mngr.close()
    step, saved = final_params(workdir)
    assert step == 0 and set(saved) == set(expected)
    for path, x in expected.items():
        np.testing.assert_array_equal(saved[path], np.asarray(x), err_msg=path)
    again = train.train(tiny_config, workdir, devices=jax.devices()[:1])  # complete: nothing redone
    assert (
        again.metrics == rows[0]
        and len(metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == 1
    )


class SleepEvaluator:
    """Off-step work of a known length: sleeps `seconds`, returns a constant."""

    def __init__(self, cfg, ctx):
        self.seconds = cfg["seconds"]

    def run(self, params):
        time.sleep(self.seconds)
        return {"slept": self.seconds}


def test_speed_leaves_out_evaluator_time_and_the_eta_adds_it_back(tiny_config, tmp_path):
    apply_overrides(
        tiny_config,
        {
            "total_steps": 6,
            "evals": {"nap": dict(type="test_train:SleepEvaluator", seconds=2.0, log_steps=2)},
        },
    )
    train.train(tiny_config, str(tmp_path), devices=jax.devices()[:1])
    rows = {r["step"]: r for r in metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))}
    assert [s for s in rows if "nap/slept" in rows[s]] == [2, 4, 6]
    # One step per window, each of a tiny model: had the 2 s naps after steps 2 and 4 counted, the
    # windows of steps 3 and 5 would be under 0.5 steps/s.
    assert all(rows[s]["steps_per_sec"] > 1.0 for s in range(2, 7))
    # ETA at step 3: 3 steps left, each carrying >= 2 s of naps / 2 steps run since step 1.
    assert rows[3]["eta_sec"] >= 3.0

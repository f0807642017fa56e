"""The classify task: losses against numpy, bf16 compute with float32 params, evaluator lookup."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from tasks import classify
from transfer import evaluators
from transfer.config import apply_overrides


@pytest.fixture()
def batch():
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
        "label": np.array([0, 5, 41, 7], np.int32),
    }


def test_eval_metrics_match_numpy(tiny_config, batch):
    task = classify.Task(tiny_config)
    params = task.init_params(jax.random.key(1), batch)
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
    logits = np.asarray(task.logits(params, batch["image"]), np.float64)
    out = task.eval_metrics(params, batch)
    log_probs = logits - logsumexp(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(out["loss"], -log_probs[np.arange(4), batch["label"]], rtol=1e-5)
    np.testing.assert_array_equal(out["prec@1"], logits.argmax(-1) == batch["label"])
    top5 = np.argsort(-logits, -1)[:, :5]
    np.testing.assert_array_equal(out["prec@5"], (top5 == batch["label"][:, None]).any(-1))


def test_zero_head_gives_uniform_loss(tiny_config, batch):
    task = classify.Task(tiny_config)
    params = task.init_params(jax.random.key(1), batch)
    loss, aux = task.loss_fn(params, batch, jax.random.key(0))
    assert float(loss) == pytest.approx(math.log(42), abs=1e-5)


def test_bf16_compute_keeps_float32_params(tiny_config, batch):
    task32 = classify.Task(tiny_config)
    params = task32.init_params(jax.random.key(1), batch)
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
    apply_overrides(tiny_config, {"model.dtype": "bfloat16"})
    task16 = classify.Task(tiny_config)
    params16 = task16.init_params(jax.random.key(1), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
    l32, _ = task32.loss_fn(params, batch, jax.random.key(0))
    l16, _ = task16.loss_fn(params, batch, jax.random.key(0))
    assert l16.dtype == jnp.float32
    assert float(l16) == pytest.approx(float(l32), rel=0.05)


def test_evaluator_lookup(tiny_config):
    task = classify.Task(tiny_config)
    assert evaluators.resolve("mean", task) is evaluators.MeanEvaluator
    assert evaluators.resolve("transfer.evaluators:MeanEvaluator", task) is evaluators.MeanEvaluator
    with pytest.raises(ValueError, match="Unknown evaluator type 'maen'"):
        evaluators.resolve("maen", task)

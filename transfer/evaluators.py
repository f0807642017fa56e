"""Evaluators the loop runs every `log_steps` and at the end; results go to metrics.jsonl as `<name>/<metric>`.

`evals.<name>.type` picks the class: "mean" (built in: averages the task's per-example `eval_metrics`), a name the
task registers in `Task.evaluators()`, or an import string "package.module:Class". An evaluator is constructed as
`Class(eval_cfg, ctx)` and has `run(params) -> dict[str, float]` (transfer/contracts.py: Evaluator, EvalContext).
The pieces evaluators share live here once: `SplitPass` (one host-padded pass over a split), `gather` (an array
from every host) and the `first_texts` pp op (a fixed number of strings per example).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from transfer import contracts, input_pipeline, pp, registry, sharding

MEAN_DEFAULTS = dict(type="mean", data=None, pp=None, batch_size=None, log_steps=None)


def settings(eval_cfg: Mapping, defaults: Mapping, kind: str) -> dict[str, Any]:
    """`eval_cfg` over `defaults`; a key the evaluator does not know is an error (a typo would be ignored)."""
    unknown = sorted(set(eval_cfg) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} for a {kind!r} evaluator; valid: {sorted(defaults)}."
        )
    return {**defaults, **dict(eval_cfg)}


class SplitPass:
    """One pass over an eval split (`data` merged over config.input.data, `pp`, `batch_size`), every host
    running the same number of batches (hosts with fewer examples get padding, `_mask` = 0). With `keys`,
    only those (and `_mask`) of a batch are kept: strings never go to the devices."""

    def __init__(
        self,
        eval_cfg: Mapping,
        ctx: contracts.EvalContext,
        keys: Sequence[str] | None = None,
        kind: str = "eval",
    ):
        config = ctx.config
        data = dict(config.input.data)
        data.update(eval_cfg.get("data") or {})
        self.input_cfg = {"data": data, "pp": eval_cfg.get("pp") or config.input.pp}
        self.batch_size = int(eval_cfg.get("batch_size") or config.input.batch_size)
        sharding.check_batch_size(self.batch_size, ctx.mesh, ctx.batch_axes(), "eval batch_size")
        self.batch_sharding = ctx.batch_sharding
        self.keys, self.kind = (tuple(keys) if keys is not None else None), kind
        input_pipeline.get_builder(data)  # Fail at start-up, not at the first evaluation.
        self._num_batches = self._batches_per_host(data)

    def _batches_per_host(self, data: Mapping) -> int:
        """Every host runs the same number of batches (collectives would hang otherwise)."""
        count = jax.process_count()
        per_host = [input_pipeline.num_examples(data, i, count) for i in range(count)]
        # A host without examples would have no padding template, and collectives would hang.
        if min(per_host) == 0:
            raise ValueError(
                f"Evaluation split {data['split']!r} of {data['name']!r} leaves some of the {count} "
                f"hosts without examples ({per_host}); use a larger split."
            )
        return math.ceil(max(per_host) / (self.batch_size // count))

    def _padded(self) -> Iterator[dict]:
        last = None
        n = 0
        for batch in input_pipeline.eval_batches(self.input_cfg, batch_size=self.batch_size):
            last = batch
            n += 1
            yield batch
        while n < self._num_batches and last is not None:  # Pad hosts with fewer examples.
            n += 1
            yield {k: (np.zeros_like(v) if k == "_mask" else v) for k, v in last.items()}

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The split's local batches (host-padded), restricted to `keys` when given."""
        for batch in self._padded():
            if self.keys is None:
                yield batch
                continue
            missing = [k for k in self.keys if k not in batch]
            if missing:
                raise ValueError(
                    f"{self.kind} evaluator: the pp {self.input_cfg['pp']!r} does not produce {missing}; "
                    f"it gives {sorted(batch)}."
                )
            yield {k: batch[k] for k in (*self.keys, "_mask")}

    def totals(self, sums: Callable[..., Mapping], params: Any) -> dict[str, np.ndarray]:
        """`sums(params, global batch)` (jitted, padding masked inside) added up over the split."""
        totals: dict[str, np.ndarray] = {}
        for batch in self.batches():
            out = jax.device_get(sums(params, sharding.put_batch(batch, self.batch_sharding)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        return totals


class MeanEvaluator(SplitPass):
    """Averages `task.eval_metrics(params, batch)` over one pass of a split (padding masked out)."""

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        settings(eval_cfg, MEAN_DEFAULTS, "mean")
        super().__init__(eval_cfg, ctx)
        task = ctx.task

        def sums(params, batch):
            values = task.eval_metrics(params, batch)
            mask = batch["_mask"].astype(jnp.float32)
            out = {k: jnp.sum(jnp.asarray(v, jnp.float32) * mask) for k, v in values.items()}
            out["_count"] = jnp.sum(mask)
            return out

        self._sums = jax.jit(sums, in_shardings=(ctx.param_shardings, ctx.batch_sharding))

    def run(self, params: Any) -> dict[str, float]:
        totals = self.totals(self._sums, params)
        count = float(totals.pop("_count", 0.0))
        if count == 0:
            raise ValueError(f"Evaluation data {self.input_cfg['data']} produced no examples.")
        return {k: float(v) / count for k, v in totals.items()}


def gather(x: Any, per_host: bool = False) -> np.ndarray:
    """A global array or a host-local numpy array -> the full array on every host (rows host-major);
    `per_host`: shaped [hosts, local rows, ...]."""
    count = jax.process_count()
    full = np.asarray(x if count == 1 else multihost_utils.process_allgather(x, tiled=True))
    return full.reshape(count, -1, *full.shape[1:]) if per_host else full


@pp.register("first_texts")
def get_first_texts(key: str = "captions/text", n: int = 5, outkey: str = "texts") -> pp.Op:
    """A variable-length string sequence -> exactly `n` strings: its first `n`, then empty strings (no
    caption), so that batches of images with different caption counts have one shape."""
    if n < 1:
        raise ValueError(f"first_texts: n must be >= 1, got {n}")

    def op(example: pp.Example) -> pp.Example:
        if key not in example:
            raise KeyError(f"first_texts: no {key!r} in the example; it has {sorted(example)}")
        texts = tf.convert_to_tensor(example[key])
        if texts.dtype != tf.string or texts.shape.rank != 1:
            raise ValueError(
                f"first_texts: {key!r} must be a sequence of strings (e.g. 'captions/text'), got "
                f"{texts.dtype.name} of shape {texts.shape}"
            )
        texts = texts[:n]
        texts = tf.concat([texts, tf.fill([n - tf.shape(texts)[0]], "")], 0)
        return {**example, outkey: tf.ensure_shape(texts, [n])}

    return op


BUILTIN = {"mean": MeanEvaluator}


def resolve(type_name: str, task: Any) -> type:
    """The evaluator class of `evals.<name>.type`, checked against the evaluator contract."""
    hook = contracts.TaskHooks.of(task).evaluators
    provided = dict(hook()) if hook else {}
    cls = provided.get(type_name) or BUILTIN.get(type_name)
    if cls is None and ":" in type_name:
        cls = registry.import_object(type_name)
    if cls is not None:
        contracts.check_evaluator(cls, type_name)
        return cls
    raise ValueError(
        f"Unknown evaluator type '{type_name}': use one of "
        f"{sorted(BUILTIN) + sorted(provided)} or 'package.module:Class'."
    )


def build(
    config: Any,
    *,
    task: Any,
    mesh: jax.sharding.Mesh,
    batch_sharding: jax.sharding.NamedSharding,
    param_shardings: Any,
) -> dict[str, tuple[contracts.Evaluator, int | None]]:
    """{name: (evaluator, log_steps)} of `config.evals`, each constructed as `Class(eval_cfg, ctx)`."""
    ctx = contracts.EvalContext(config, task, mesh, batch_sharding, param_shardings)
    evaluators = {}
    for name, eval_cfg in (config.evals or {}).items():
        eval_cfg = dict(eval_cfg)
        cls = resolve(eval_cfg.get("type", "mean"), task)
        evaluators[name] = (cls(eval_cfg, ctx), eval_cfg.get("log_steps"))
    return evaluators

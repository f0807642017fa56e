"""Evaluators the loop runs every `log_steps` and at the end; results go to metrics.jsonl as `<name>/<metric>`.

`evals.<name>.type` picks the class: "mean" (built in: averages the task's per-example `eval_metrics`), a name the
task registers in `Task.evaluators()`, or an import string "package.module:Class". An evaluator is constructed as
`Class(eval_cfg, task=..., config=..., mesh=..., batch_sharding=..., param_shardings=...)` and has
`run(params) -> dict[str, float]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transfer import input_pipeline, registry, sharding

MEAN_DEFAULTS = dict(type="mean", data=None, pp=None, batch_size=None, log_steps=None)


def settings(eval_cfg: Mapping, defaults: Mapping, kind: str) -> dict[str, Any]:
    """`eval_cfg` over `defaults`; a key the evaluator does not know is an error (a typo would be ignored)."""
    unknown = sorted(set(eval_cfg) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} for a {kind!r} evaluator; valid: {sorted(defaults)}."
        )
    return {**defaults, **dict(eval_cfg)}


class MeanEvaluator:
    """Averages `task.eval_metrics(params, batch)` over one pass of a split (padding masked out)."""

    def __init__(
        self,
        eval_cfg: Mapping,
        *,
        task: Any,
        config: Any,
        mesh: jax.sharding.Mesh,
        batch_sharding: jax.sharding.NamedSharding,
        param_shardings: Any,
    ):
        settings(eval_cfg, MEAN_DEFAULTS, "mean")
        data = dict(config.input.data)
        data.update(eval_cfg.get("data") or {})
        self.input_cfg = {"data": data, "pp": eval_cfg.get("pp") or config.input.pp}
        self.batch_size = int(eval_cfg.get("batch_size") or config.input.batch_size)
        axes = batch_sharding.spec[0]
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        sharding.check_batch_size(self.batch_size, mesh, axes, "eval batch_size")
        self.batch_sharding = batch_sharding
        input_pipeline.get_builder(data)  # Fail at start-up, not at the first evaluation.
        self._num_batches = self._batches_per_host(data)

        def sums(params, batch):
            values = task.eval_metrics(params, batch)
            mask = batch["_mask"].astype(jnp.float32)
            out = {k: jnp.sum(jnp.asarray(v, jnp.float32) * mask) for k, v in values.items()}
            out["_count"] = jnp.sum(mask)
            return out

        self._sums = jax.jit(sums, in_shardings=(param_shardings, batch_sharding))

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

    def _batches(self) -> Iterator[dict]:
        last = None
        n = 0
        for batch in input_pipeline.eval_batches(self.input_cfg, batch_size=self.batch_size):
            last = batch
            n += 1
            yield batch
        while n < self._num_batches and last is not None:  # Pad hosts with fewer examples.
            n += 1
            yield {k: (np.zeros_like(v) if k == "_mask" else v) for k, v in last.items()}

    def run(self, params: Any) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in self._batches():
            out = self._sums(params, sharding.put_batch(batch, self.batch_sharding))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("_count", 0.0)
        if count == 0:
            raise ValueError(f"Evaluation data {self.input_cfg['data']} produced no examples.")
        return {k: v / count for k, v in totals.items()}


BUILTIN = {"mean": MeanEvaluator}


def resolve(type_name: str, task: Any) -> type:
    provided = dict(task.evaluators()) if hasattr(task, "evaluators") else {}
    if type_name in provided:
        return provided[type_name]
    if type_name in BUILTIN:
        return BUILTIN[type_name]
    if ":" in type_name:
        return registry.import_object(type_name)
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
) -> dict[str, Any]:
    evaluators = {}
    for name, eval_cfg in (config.evals or {}).items():
        eval_cfg = dict(eval_cfg)
        cls = resolve(eval_cfg.get("type", "mean"), task)
        evaluators[name] = (
            cls(
                eval_cfg,
                task=task,
                config=config,
                mesh=mesh,
                batch_sharding=batch_sharding,
                param_shardings=param_shardings,
            ),
            eval_cfg.get("log_steps"),
        )
    return evaluators

"""The task and evaluator contracts as code: what the loop calls, checked when a task or evaluator is loaded.

A task module (`config.task`) holds a class `Task(config)` satisfying `Task` below, optionally any of the hook
Protocols, and optionally a module-level `DEFAULTS` mapping (the task's config keys; a sub-tree declared there
is validated key by key). An evaluator class satisfies `Evaluator`: the loop constructs it as
`Class(eval_cfg, ctx)` with an `EvalContext`, and may call `write` (`Writer`) after each `run`.

The loop reaches an optional hook only through `optional(obj, Protocol)` (the bound method or None), and a
task's hooks through `TaskHooks`, resolved once when the run is set up; it never probes with hasattr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Protocol

import jax


class Task(Protocol):
    """What every task provides. `batch` is one local batch of numpy arrays (shapes only in `init_params`)."""

    def init_params(self, rng: jax.Array, batch: dict) -> dict:
        """A nested dict of parameters."""

    def loss_fn(self, params: Any, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """A scalar loss averaged over the batch, and a dict of scalar metrics."""

    def eval_metrics(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        """Per-example values [B] that the `mean` evaluator averages."""


class ProvidesEvaluators(Protocol):
    """Optional: extra evaluator classes by type name (`evals.<name>.type`)."""

    def evaluators(self) -> Mapping[str, type]: ...


class CountsFlops(Protocol):
    """Optional: model FLOPs of one training example for `perf/mfu`, when XLA's count of the step would be
    wrong (it counts a scanned layer stack once)."""

    def flops_per_example(self, batch: dict) -> float: ...


class Finalizes(Protocol):
    """Optional: called on process 0 after the final step, to write the reports a person reads."""

    def finalize(self, workdir: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What the loop hands every evaluator besides its own `evals.<name>` config."""

    config: Any  # the run's merged config
    task: Any  # the `Task` instance
    mesh: jax.sharding.Mesh
    batch_sharding: jax.sharding.NamedSharding  # rows of a global batch over the batch axes
    param_shardings: Any  # a tree like the params: how they are sharded

    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes a batch's rows are split over."""
        axes = self.batch_sharding.spec[0]
        return (axes,) if isinstance(axes, str) else tuple(axes or ())


class Evaluator(Protocol):
    """Constructed once per `evals.<name>` at start-up (fail there, not at the first evaluation)."""

    def __init__(self, eval_cfg: Mapping, ctx: EvalContext) -> None: ...

    def run(self, params: Any) -> dict[str, float]:
        """Metrics of the merged (trainable + frozen) params; logged as `<name>/<metric>`."""


class Writer(Protocol):
    """Optional: the loop calls `write` on process 0 after each `run` (predictions, sample pages)."""

    def write(self, workdir: str, step: int, name: str) -> None: ...


TASK_HOOKS = (ProvidesEvaluators, CountsFlops, Finalizes)


def members(protocol: type) -> tuple[str, ...]:
    """The method names a Protocol declares (in order)."""
    return tuple(k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_"))


def optional(obj: Any, protocol: type) -> Callable | None:
    """`obj`'s method of the one-method optional `protocol` (a hook above, or `Writer`), or None if it has none."""
    (name,) = members(protocol)
    return getattr(obj, name, None)


@dataclasses.dataclass(frozen=True)
class TaskHooks:
    """A task's optional hooks, each the bound method or None (the task does not provide it)."""

    evaluators: Callable[[], Mapping[str, type]] | None
    flops_per_example: Callable[[dict], float] | None
    finalize: Callable[[str], None] | None

    @classmethod
    def of(cls, task: Any) -> TaskHooks:
        return cls(
            evaluators=optional(task, ProvidesEvaluators),
            flops_per_example=optional(task, CountsFlops),
            finalize=optional(task, Finalizes),
        )


def check_task_module(module: ModuleType) -> None:
    """A task module without `Task`, a required method, a callable hook or a mapping `DEFAULTS` is an error
    naming what is missing."""
    where = f"task module {module.__name__!r}"
    cls = getattr(module, "Task", None)
    if not isinstance(cls, type):
        raise TypeError(f"{where} has no class `Task(config)` (transfer/contracts.py: Task).")
    missing = [m for m in members(Task) if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(
            f"{where}: Task lacks {', '.join(missing)} (the task contract, transfer/contracts.py: Task)."
        )
    for hook in TASK_HOOKS:
        for m in members(hook):
            if hasattr(cls, m) and not callable(getattr(cls, m)):
                raise TypeError(f"{where}: Task.{m} must be a method ({hook.__name__}).")
    defaults = getattr(module, "DEFAULTS", None)
    if defaults is not None and not hasattr(defaults, "keys"):  # a dict or a ConfigDict
        raise TypeError(
            f"{where}: DEFAULTS must be a mapping of config keys, got {type(defaults)}."
        )


def check_evaluator(cls: Any, type_name: str) -> None:
    """An evaluator class without `run` is an error naming it."""
    if not callable(getattr(cls, "run", None)):
        raise TypeError(
            f"evaluator type {type_name!r} ({cls!r}) lacks run(params) (transfer/contracts.py: Evaluator)."
        )

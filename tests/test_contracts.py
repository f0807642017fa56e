"""The task and evaluator contracts (transfer/contracts.py) are checked when a task or evaluator is loaded."""

import dataclasses
import sys
import types

import ml_collections
import pytest

from transfer import contracts, evaluators, registry, train


class _Complete:
    def init_params(self, rng, batch):
        return {}

    def loss_fn(self, params, batch, rng):
        return 0.0, {}

    def eval_metrics(self, params, batch):
        return {}


def _task_module(monkeypatch, name: str, task_cls, **attrs) -> str:
    module = types.ModuleType(name)
    module.Task = task_cls
    for k, v in attrs.items():
        setattr(module, k, v)
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_a_task_without_loss_fn_fails_at_load_naming_it(monkeypatch):
    class NoLoss(_Complete):
        loss_fn = None

    name = _task_module(monkeypatch, "fake_tasks.no_loss", NoLoss)
    config = ml_collections.ConfigDict({"task": name})
    with pytest.raises(TypeError, match="Task lacks loss_fn"):
        train.prepare_config(config)  # The loop's first step: resolving config.task.


def test_every_missing_piece_is_named(monkeypatch):
    class Bare:
        def loss_fn(self, params, batch, rng):
            return 0.0, {}

    with pytest.raises(TypeError, match="Task lacks init_params, eval_metrics"):
        registry.import_task(_task_module(monkeypatch, "fake_tasks.bare", Bare))
    with pytest.raises(TypeError, match="no class `Task"):
        registry.import_task(_task_module(monkeypatch, "fake_tasks.none", None))
    with pytest.raises(TypeError, match="Task.finalize must be a method"):
        registry.import_task(
            _task_module(monkeypatch, "fake_tasks.hook", type("T", (_Complete,), {"finalize": 1}))
        )
    with pytest.raises(TypeError, match="DEFAULTS must be a mapping"):
        registry.import_task(_task_module(monkeypatch, "fake_tasks.d", _Complete, DEFAULTS=[1]))
    assert registry.import_task(_task_module(monkeypatch, "fake_tasks.ok", _Complete))


@pytest.mark.parametrize("name", ["classify", "caption", "ocr", "vqa", "siglit", "linear_probe"])
def test_shipped_tasks_satisfy_the_contract(name):
    registry.import_task(name)
    registry.import_task("pretrain.cappa_task")


def test_an_evaluator_without_run_fails_naming_run():
    class Task(_Complete):
        def evaluators(self):
            return {"broken": object}

    with pytest.raises(TypeError, match="lacks run"):
        evaluators.resolve("broken", Task())
    assert evaluators.resolve("mean", Task()) is evaluators.MeanEvaluator


def test_protocol_members():
    assert contracts.members(contracts.Task) == ("init_params", "loss_fn", "eval_metrics")
    assert contracts.members(contracts.Evaluator) == ("run",)


def test_task_hooks_are_the_bound_methods_or_none():
    class WithFinalize(_Complete):
        def finalize(self, workdir):
            return workdir

    task = WithFinalize()
    hooks = contracts.TaskHooks.of(task)
    assert hooks.evaluators is None and hooks.flops_per_example is None
    assert hooks.finalize("w") == "w"
    # One field per declared hook, so a new hook Protocol cannot be forgotten here.
    fields = [f.name for f in dataclasses.fields(contracts.TaskHooks)]
    assert fields == [m for hook in contracts.TASK_HOOKS for m in contracts.members(hook)]
    assert contracts.optional(object(), contracts.Writer) is None

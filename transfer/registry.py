"""Finds plugins by name, so the engine never imports a task or a model directly.

`"classify"` resolves to the module `tasks.classify`; any dotted import string (`"mypkg.mytask"`) works too, and
`"module:Attr"` names an attribute of a module (used for evaluator classes).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from types import ModuleType
from typing import Any

from transfer import contracts
from transfer.config import ConfigError

TASK_PACKAGE = "tasks"


def available_tasks() -> list[str]:
    try:
        package = importlib.import_module(TASK_PACKAGE)
    except ImportError:
        return []
    return sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")
    )


def import_task(name: str) -> ModuleType:
    """The task module for `config.task` (a name in tasks/ or an import string), checked against the task
    contract (transfer/contracts.py) so that a missing method fails here, naming it."""
    if not name:
        raise ConfigError(
            f"config.task is empty: set it to one of {available_tasks()} "
            "or to an import string of your own task module."
        )
    candidates = [name] if "." in name else [f"{TASK_PACKAGE}.{name}"]
    try:
        module = importlib.import_module(candidates[0])
    except ModuleNotFoundError as e:
        if e.name not in (candidates[0], TASK_PACKAGE, *_parents(candidates[0])):
            raise  # The task exists but one of ITS imports is missing: show the real error.
        close = difflib.get_close_matches(name, available_tasks(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown task '{name}'.{hint} Tasks: {available_tasks()}.") from None
    contracts.check_task_module(module)
    return module


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_object(spec: str) -> Any:
    """`"package.module:Attr"` -> the attribute."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"'{spec}' is not an import string of the form 'package.module:Attr'.")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"Module '{module_name}' has no attribute '{attr}'.") from None

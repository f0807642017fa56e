"""Parameter trees addressed by path: `img/encoder/block_3/mlp/wi/kernel`.

Every rule in a config (freezing, lr/wd multipliers, sharding, checkpoint loading) is a list of `(regex, value)` pairs
matched with `re.fullmatch` against these paths; the first match wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax import traverse_util

_NO_MATCH = object()


def flatten(tree: Mapping) -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    return traverse_util.flatten_dict(_to_dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _to_dict(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def first_match(path: str, rules: Sequence[tuple[str, Any]], default: Any = _NO_MATCH) -> Any:
    """The value of the first rule whose regex fully matches `path`."""
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    if default is _NO_MATCH:
        raise KeyError(path)
    return default


def check_rules(rules: Any, name: str) -> list[tuple[str, Any]]:
    """Normalises `[(regex, value), ...]` from a config and reports malformed entries clearly."""
    out = []
    for i, rule in enumerate(rules or []):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"config.{name}[{i}] = {rule!r}: expected a (regex, value) pair.")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"config.{name}[{i}]: invalid regex {rule[0]!r}: {e}") from None
        out.append((rule[0], rule[1]))
    return out


def merge(*trees: Mapping) -> dict:
    """Union of trees with disjoint leaves (e.g. trainable and frozen params)."""
    flat: dict[str, Any] = {}
    for tree in trees:
        flat.update(flatten(tree))
    return unflatten(flat) if flat else {}


def partition(tree: Mapping, keep: Any) -> tuple[dict, dict]:
    """Splits a tree by `keep(path) -> bool` into (kept, rest), each with only its own leaves."""
    kept, rest = {}, {}
    for path, leaf in flatten(tree).items():
        (kept if keep(path) else rest)[path] = leaf
    return (unflatten(kept) if kept else {}), (unflatten(rest) if rest else {})

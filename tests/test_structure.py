"""The layout: no import cycle among our packages, dependencies point tasks -> pretrain -> transfer, nothing
imports a config, and a config's pp works in a fresh process through its `pp_modules` alone."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("transfer", "pretrain", "tasks")
LAYER = {"transfer": 0, "pretrain": 1, "tasks": 2}


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every .py file of our packages."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, name), ROOT)[: -len(".py")]
                    out[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(
                        folder, name
                    )
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of ours it imports}, counting imports anywhere in the file (lazy ones too)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for name in names:
                while (
                    name and name not in modules
                ):  # `from pkg import x`: x is a module or an object
                    name = name.rpartition(".")[0]
                # A package's own __init__ runs before its modules anyway: not an edge.
                if name and not module.startswith(name + ".") and name not in (module, *PACKAGES):
                    targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a] of `graph`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_and_layers_point_one_way():
    graph = import_graph()
    assert "transfer.pp" in graph and "tasks.fewshot" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    upward = [
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]
    ]
    assert not upward, f"imports against tasks -> pretrain -> transfer: {upward}"


def test_nothing_imports_a_config():
    """Configs are data loaded by path (transfer.config.load_config_file): no package may claim `configs`."""
    for folder in ("transfer", "pretrain", "tasks", "tests", "benchmarks", "configs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in (f for f in files if f.endswith(".py")):
                with open(os.path.join(dirpath, name)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    if isinstance(node, ast.ImportFrom) and node.module:
                        names = [node.module]
                    bad = [n for n in names if n.split(".")[0] in ("configs", "demo")]
                    assert not bad, f"{dirpath}/{name} imports {bad}"
    assert not os.path.exists(os.path.join(ROOT, "configs", "__init__.py"))


def test_ocr_config_pp_in_a_fresh_process(scenes_tokenizer):
    """configs/ocr.py's train pp parses and runs through `pp_modules` alone: no task module imported first."""
    script = f"""
import sys
import numpy as np
import tensorflow as tf
from transfer import config as config_lib, pp

config = config_lib.load_config_file("configs/ocr.py:tokenizer={scenes_tokenizer.path}")
assert "tasks.ocr_pp" in config.pp_modules, config.pp_modules
try:
    pp.parse(config.input.pp)
except ValueError as e:
    assert "Unknown pp op 'fold'" in str(e) and "pp_modules" in str(e), e
else:
    raise AssertionError("fold parsed without its module")
op = tf.function(pp.parse(config.input.pp, config.pp_modules))
strip = tf.io.encode_png(tf.constant(np.full((32, 128, 3), 200, np.uint8)))
seed = tf.constant([1, 2], tf.int64)
out = op({{"image": strip, "text": tf.constant("A red circle"), "image/id": tf.constant(1), "_seed": seed}})
assert out["image"].shape == (64, 64, 3) and out["labels"].dtype == tf.int32, out
assert not any(m in sys.modules for m in ("tasks.ocr", "tasks.vqa_eval", "tasks.caption_eval")), "task imported"
print("ok")
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]

"""docs/adding_a_task.md's example task and config, copied out of the page, train through the loop unchanged."""

import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from transfer import config as config_lib
from transfer import metrics, train

DOC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "adding_a_task.md"
)


def _code_blocks() -> dict[str, str]:
    """{file name: code} of the ```python blocks that follow a `## `path`` heading."""
    text = open(DOC, encoding="utf-8").read()
    return dict(re.findall(r"## `([\w/.]+)`\n\n```python\n(.*?)```", text, flags=re.S))


def test_example_is_small():
    blocks = _code_blocks()
    assert set(blocks) == {"tasks/count_regression.py", "configs/count_regression.py"}
    assert sum(code.count("\n") for code in blocks.values()) < 150


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, data_dir):
    blocks = _code_blocks()
    root = tmp_path_factory.mktemp("doc_example")
    package = root / "doc_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "count_regression.py").write_text(blocks["tasks/count_regression.py"])
    config_path = root / "count_config.py"
    config_path.write_text(blocks["configs/count_regression.py"])
    shutil.copy(os.path.join(os.path.dirname(DOC), "..", "configs", "cappa_tiny.py"), root)
    sys.path.insert(0, str(root))
    try:
        config = config_lib.load_config_file(str(config_path))
        # Only what differs in a test: the module's import path, tiny data, no CapPa run to load.
        config.task = "doc_example.count_regression"
        config, _ = train.prepare_config(config)
        config_lib.apply_overrides(
            config,
            {"input.data.name": "scenes/tiny", "input.data.data_dir": data_dir,
             "input.batch_size": 16, "input.shuffle_buffer_size": 64, "total_steps": 40,
             "model_init": None, "evals.val.batch_size": 16, "log_flops": False},
        )  # fmt: skip
        workdir = str(tmp_path_factory.mktemp("count_run"))
        initial = train.setup(config, str(tmp_path_factory.mktemp("count_init"))).state["frozen"]
        result = train.train(config, workdir)
    finally:
        sys.path.remove(str(root))
    return workdir, result, initial


def test_example_trains_through_the_loop(example_run, data_dir):
    import tensorflow_datasets as tfds

    workdir, result, initial = example_run
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    start = next(r for r in rows if r["step"] == 0)
    final = result.metrics
    counts = np.array(
        [
            ex["count"] + 1.0
            for ex in tfds.as_numpy(tfds.load("scenes/tiny", split="validation", data_dir=data_dir))
        ]
    )
    # At step 0 the head predicts ~0 counts: its MAE is about the mean count.
    assert start["val/mae"] == pytest.approx(np.mean(counts), abs=0.5)
    assert final["val/mae"] < 0.5 * start["val/mae"]
    # The config's schedule rule froze the tower: bit-identical to its initial values after training.
    same = jax.tree.map(
        np.array_equal, jax.device_get(initial["img"]), jax.device_get(result.params["img"])
    )
    assert set(initial) == {"img"} and all(jax.tree.leaves(same))

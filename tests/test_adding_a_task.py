"""docs/adding_a_task.md's example task and config, copied out of the page, train through the loop unchanged."""

import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from transfer import config as config_lib
from transfer import metrics, train, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "adding_a_task.md")
CAPPA_TINY = os.path.join(ROOT, "configs", "cappa_tiny.py")


def _code_blocks() -> dict[str, str]:
    """{file name: code} of the ```python blocks that follow a `## `path`` heading."""
    text = open(DOC, encoding="utf-8").read()
    return dict(re.findall(r"## `([\w/.]+)`\n\n```python\n(.*?)```", text, flags=re.S))


def test_example_is_small():
    blocks = _code_blocks()
    assert set(blocks) == {"tasks/count_regression.py", "configs/count_regression.py"}
    assert sum(code.count("\n") for code in blocks.values()) < 150


@pytest.fixture(scope="module")
def cappa_run(tmp_path_factory, data_dir, scenes_tokenizer):
    """What the page's config loads: a `configs/cappa_tiny.py` run (here its step-0 checkpoint, on tiny data)."""
    config = config_lib.load_config_file(f"{CAPPA_TINY}:tokenizer={scenes_tokenizer.path}")
    config, _ = train.prepare_config(config)
    config_lib.apply_overrides(
        config,
        {
            "input.data.name": "scenes/tiny",
            "input.data.data_dir": data_dir,
            "input.batch_size": 16,
            "input.shuffle_buffer_size": 64,
            "model.txt.vocab_size": scenes_tokenizer.vocab_size,
            "total_steps": 0,
            "ckpt_steps": 1,
            "evals": {},
            "log_flops": False,
        },
    )
    workdir = str(tmp_path_factory.mktemp("cappa_tiny"))
    train.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, data_dir, cappa_run):
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
        # Only what differs in a test: the module's import path, tiny data, where the CapPa run is. The
        # page's model_load (dont_load) and schedule are used as written.
        config.task = "doc_example.count_regression"
        config, _ = train.prepare_config(config)
        config_lib.apply_overrides(
            config,
            {
                "input.data.name": "scenes/tiny",
                "input.data.data_dir": data_dir,
                "input.batch_size": 16,
                "input.shuffle_buffer_size": 64,
                "total_steps": 40,
                "model_init": cappa_run,
                "evals.val.batch_size": 16,
                "log_flops": False,
            },
        )
        workdir = str(tmp_path_factory.mktemp("count_run"))
        initial = train.setup(config, str(tmp_path_factory.mktemp("count_init"))).state["frozen"]
        result = train.train(config, workdir)
    finally:
        sys.path.remove(str(root))
    return workdir, result, initial


def test_example_trains_through_the_loop(example_run, cappa_run, data_dir):
    import tensorflow_datasets as tfds
    from helpers import final_params

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
    # At step 0 the head predicts ~0 counts: its MAE is about the mean count (within the spread of the fresh
    # head's outputs: 3.0 against a mean count of 2.5 on the 16 scenes 2.0.0 validation images).
    assert start["val/mae"] == pytest.approx(np.mean(counts), abs=1.0)
    assert final["val/mae"] < 0.5 * start["val/mae"]
    # model_init loaded the CapPa run's tower (its txt/ skipped, the new head_ layers from their init) and
    # the config's schedule rule froze it: bit-identical to the CapPa run's values after training.
    _, cappa = final_params(cappa_run)
    assert set(initial) == {"img"} and any(p.startswith("txt/") for p in cappa)
    for name, tower in (("loaded", initial["img"]), ("trained", result.params["img"])):
        flat = {"img/" + p: np.asarray(x) for p, x in tree.flatten(jax.device_get(tower)).items()}
        assert set(flat) == {p for p in cappa if p.startswith("img/")}
        for path, x in flat.items():
            np.testing.assert_array_equal(x, cappa[path], err_msg=f"{name} {path}")

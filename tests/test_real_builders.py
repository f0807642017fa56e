"""Every TFDS dataset a shipped config names runs through its REAL builder (tests/real_tfds.py: the builder's
feature spec and split names, random examples): the config's pp, two train steps and every evaluator it defines,
through the one loop; `configs/fewshot.py:big_vision` through `cappa probe`. A feature key or a split name the
dataset does not have fails here. Choices naming a dataset no installed TFDS builder serves are strict xfails.

Configs whose datasets are all embedded (classify, finetune, linear_probe, siglit, cappa_tiny) or img2dataset
shards (cappa_b16, cappa_l16) have nothing to check here.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
import real_tfds
import tensorflow_datasets as tfds

from tasks import fewshot_datasets as fewshot_table
from transfer import cli, file_sources, input_pipeline, shards, train
from transfer import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ocr_config = config_lib.load_config_module(os.path.join(ROOT, "configs", "ocr.py"))
vqa_config = config_lib.load_config_module(os.path.join(ROOT, "configs", "vqa.py"))
K = 8  # examples per split part and batch size (one per fake device)
TINY_MODEL = dict(
    img=dict(width=32, depth=1, mlp_dim=64, num_heads=2),
    txt=dict(depth=1, mlp_dim=64),
)
# METEOR and SPICE add a slow Java start-up and check nothing more about the data.
CAPTION_METRICS = ("bleu", "rouge", "cider")


def _choices() -> list[tuple[str, str]]:
    """(config file, arg) of every shipped choice that reads a TFDS dataset that is not embedded."""
    # tower=finetune: the shipped evaluators plus the few-shot probe (a frozen tower skips it).
    out = [("caption_coco.py", "data=coco,tower=finetune")]
    out += [("vqa.py", f"data={key}") for key in vqa_config.DATASETS if key != "scenes"]
    out += [("ocr.py", f"data={key}") for key in ocr_config.DATASETS if key != "scenes"]
    return out


def _tfds_name(name: str, arg: str) -> str | None:
    """The TFDS name the choice trains on; None for another source (official files, shards, a plugin)."""
    data = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}:{arg}")).input.data
    other = data.get("source") or shards.is_shards(data) or file_sources.is_files(data)
    return None if other else data.name


def _params() -> list[Any]:
    """pytest params of the TFDS choices; a dataset without a builder is a strict xfail (fails at start-up)."""
    params = []
    for name, arg in _choices():
        dataset = _tfds_name(name, arg)
        if dataset is None:
            continue
        marks = []
        if not real_tfds.builder_exists(dataset):
            reason = f"tensorflow-datasets {tfds.__version__} has no builder {dataset!r}"
            xfail = pytest.mark.xfail
            marks = [xfail(strict=True, raises=input_pipeline.DataNotPreparedError, reason=reason)]
        params.append(pytest.param(name, arg, marks=marks, id=f"{name}:{arg}"))
    return params


def _shrink_fewshot(datasets: Any) -> dict[str, dict[str, str]]:
    """{name: shrunk train/test splits} of a few-shot evaluator's datasets (table names or mappings)."""
    specs = {n: {} for n in datasets} if not hasattr(datasets, "items") else dict(datasets)
    return {
        n: {
            f"{which}_split": real_tfds.shrink(
                dict(fewshot_table.DATASETS[n], **(spec or {}))[f"{which}_split"], K
            )
            for which in ("train", "test")
        }
        for n, spec in specs.items()
    }


def tiny(config: Any, vocab_size: int) -> Any:
    """The config at test size: tiny CapPa towers from scratch, K examples per split part, 2 steps."""
    config.model_init = None
    for tower, sizes in TINY_MODEL.items():
        config.model[tower].update(sizes)
    config.model.txt.vocab_size = vocab_size
    steps = dict(total_steps=2, ckpt_steps=2, log_training_steps=1)
    config.update(dict(steps, log_flops=False, eval_at_start=False))
    config.input.update(batch_size=K, shuffle_buffer_size=K)
    config.input.data.split = real_tfds.shrink(config.input.data.split, K)
    for ev_name, ev in config.evals.to_dict().items():
        ev["batch_size"] = K
        if "data" in ev:
            ev["data"]["split"] = real_tfds.shrink(ev["data"]["split"], K)
        if ev["type"] == "caption":
            ev["metrics"] = CAPTION_METRICS
        if ev["type"] == "tasks.fewshot:Evaluator":
            ev.update(shots=(1,), seeds=(0,), short_classes="use_all", l2_grid=(1.0,))
            ev["datasets"] = _shrink_fewshot(ev["datasets"])
        config.evals[ev_name] = ev
    return config


def load(name: str, arg: str, tokenizer: Any) -> Any:
    """configs/<name>:<arg> on the tiny CapPa architecture with the session tokenizer, at test size."""
    spec = os.path.join(ROOT, "configs", f"{name}:{arg},arch=tiny,tokenizer={tokenizer.path}")
    return tiny(config_lib.load_config_file(spec), tokenizer.vocab_size)


@pytest.fixture(scope="module")
def run_choice(scenes_tokenizer, tmp_path_factory):
    """`run_choice(name, arg)` -> (config, result, workdir) of the tiny run of a choice, run once per module."""
    runs = {}

    def run(name: str, arg: str) -> tuple[Any, Any, str]:
        if (name, arg) not in runs:
            config = load(name, arg, scenes_tokenizer)
            workdir = str(tmp_path_factory.mktemp("real_builder_run"))
            with real_tfds.real_builders():
                config, _ = train.prepare_config(config)
                runs[name, arg] = config, train.train(config, workdir), workdir
        return runs[name, arg]

    return run


@pytest.mark.parametrize("name,arg", _params())
def test_config_runs_on_the_real_builder(name, arg, run_choice):
    config, result, _ = run_choice(name, arg)
    logged = set(result.metrics)
    assert math.isfinite(result.metrics["train/loss"])
    for ev_name, ev in config.evals.items():  # every evaluator ran and logged under its name
        assert any(key.startswith(f"{ev_name}/") for key in logged), (ev_name, sorted(logged))
        if ev.type == "caption":
            assert result.metrics[f"{ev_name}/images"] == K
        if ev.type == "tasks.fewshot:Evaluator":
            assert {f"{ev_name}/{d}/1shot" for d in ev.datasets} <= logged


@pytest.mark.parametrize(
    "mutate,error",
    [
        ("input.data.split=validation", "Unknown split 'validation'"),  # Karpathy's is `val`
        ("evals.caption.data.split=validation[:8]", "Unknown split 'validation'"),
        ("input.pp=decode|keep('image', 'caption')", "caption"),  # the feature is `captions/text`
    ],
)
def test_a_wrong_split_or_feature_key_fails(mutate, error, scenes_tokenizer, tmp_path):
    """The checks above are real: the same config with one wrong name fails on the real builder."""
    config = load("caption_coco.py", "data=coco", scenes_tokenizer)
    key, value = mutate.split("=", 1)
    config_lib.apply_overrides(config, {key: value})
    with real_tfds.real_builders(), pytest.raises(Exception, match=error):
        train.train(train.prepare_config(config)[0], str(tmp_path))


BIG_VISION = fewshot_table.PRESETS["big_vision"]


def test_fewshot_big_vision_probes_every_dataset(run_choice, tmp_path, capsys):
    """`cappa probe --config configs/fewshot.py:big_vision`: each dataset's pp, label key and splits (the tower:
    the COCO caption run's)."""
    tower = run_choice(*_choices()[0])[2]
    shrunk = _shrink_fewshot(BIG_VISION)
    splits = [f"--config.datasets.{n}.{k}={v}" for n, s in shrunk.items() for k, v in s.items()]
    argv = [
        "probe",
        "--checkpoint",
        tower,
        "--config",
        os.path.join(ROOT, "configs", "fewshot.py:big_vision"),
        "--out",
        str(tmp_path),
        "--config.shots=(1,)",
        "--config.seeds=(0,)",
        "--config.short_classes=use_all",
        "--config.l2_grid=(1.0,)",
        f"--config.batch_size={K}",
        *splits,
    ]
    with real_tfds.real_builders():
        code = cli.main(argv)
    assert code == 0, capsys.readouterr().err
    report = json.load(open(tmp_path / "fewshot.json"))["datasets"]
    assert sorted(report) == sorted(BIG_VISION)
    for name, d in report.items():
        assert (d["train_size"], d["test_size"]) == (K, K), name
        assert "1" in d["shots"], name


def test_real_split_names_come_from_the_builders_tests():
    """The mock's split names are TFDS's own record (COCO's Karpathy splits, uc_merced's single split)."""
    assert real_tfds.real_split_names("coco_captions") == ("train", "val", "test", "restval")
    assert real_tfds.real_split_names("uc_merced") == ("train",)
    assert set(real_tfds.real_split_names("imagenet2012")) >= {"train", "validation"}
    assert real_tfds.shrink("train+restval", 4) == "train[0:4]+restval[0:4]"
    assert real_tfds.shrink("train[1000:]", 4) == "train[1000:1004]"

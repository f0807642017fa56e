"""`cappa demo --smoke`: every stage of the main job end to end with the smallest settings; the report's
numbers are summary.json's; a second run reuses every finished stage."""

import json
import os
import re

import pytest

from tasks.demo import pipeline, report


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("demo"))
    assert pipeline.main(["--workdir", workdir, "--smoke", "--data_dir", data_dir]) == 0
    return workdir


def _read(workdir, name):
    with open(os.path.join(workdir, name), encoding="utf-8") as f:
        return f.read()


def test_every_stage_finished_and_wrote_its_outputs(smoke):
    for name, _, _ in pipeline.STAGES:
        assert os.path.isfile(os.path.join(smoke, name, "result.json")), name
    assert os.path.isfile(os.path.join(smoke, "tokenizer", "scenes_bpe96.model"))
    pngs = json.loads(_read(smoke, "attention/result.json"))["pngs"]
    assert len(pngs) == 2
    samples = _read(smoke, "caption/run/captions/caption_samples.html")
    assert samples.count("<img ") == 16  # the whole scenes/tiny validation split


def test_report_numbers_are_summary_numbers(smoke):
    summary = json.loads(_read(smoke, "summary.json"))
    md = _read(smoke, "report.md")
    headline = summary["headline"]
    transfers = {row["transfer"].split(",")[0] for row in headline}
    assert {"few-shot linear probe", "MAP probe (trained", "SigLiT (frozen tower)"} <= transfers
    assert {
        "caption fine-tune (frozen tower)",
        "VQA (frozen tower)",
        "OCR (frozen tower)",
    } <= transfers
    verdict = summary["tower_vs_random"]
    compared = [r for r in headline if r["baseline_is"] == "random-init tower"]
    assert verdict["rows"] == len(compared) > 0
    assert verdict["pretrained_better"] == sum(r["model"] > r["baseline"] for r in compared)
    assert report.verdict_text(verdict) in md
    lines = md.splitlines()
    for row in headline:  # each row appears verbatim, formatted from summary.json
        cells = [
            row["transfer"],
            row["metric"],
            report.fmt(row["model"]),
            report.fmt(row["baseline"]),
        ]
        assert any(
            all(f"| {c} |" in line or line.startswith(f"| {c} |") for c in cells) for line in lines
        ), row
    # The few-shot rows come from the probe reports of the two towers.
    fewshot = json.loads(_read(smoke, "fewshot/pretrain/fewshot.json"))
    digits = fewshot["datasets"]["digits"]["shots"]
    row = next(r for r in headline if r["metric"] == "2-shot top-1")
    assert row["model"] == digits["2"]["mean"]
    random = json.loads(_read(smoke, "fewshot/random_tower/fewshot.json"))
    assert row["baseline"] == random["datasets"]["digits"]["shots"]["2"]["mean"]
    # The caption baseline is the constant caption's score logged by the caption evaluator.
    cider = next(r for r in headline if r["metric"] == "CIDEr")
    final = summary["stages"]["caption"]["final"]
    assert (cider["model"], cider["baseline"]) == (
        final["caption/CIDEr"],
        final["caption/baseline/CIDEr"],
    )
    html = _read(smoke, "report.html")
    assert html.count("data:image/png;base64,") >= 4 and report.fmt(cider["model"]) in html


def test_random_tower_is_the_untrained_init(smoke):
    """Same architecture and seed as the pretrained tower, never updated: its weights are the init, bit for bit."""
    import jax
    import numpy as np

    from pretrain import features, runs
    from transfer import input_pipeline, train, tree

    run = os.path.join(smoke, "random_tower", "run")
    rnd = features.load_tower(run)
    pre = features.load_tower(os.path.join(smoke, "pretrain", "run"))
    assert rnd.vit_kw == pre.vit_kw and rnd.step == 0 and rnd.digest != pre.digest
    # The init as the loop computes it for this config: task.init_params on the seed's init key.
    config, task_module = train.prepare_config(runs.read_config(run))
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    batch = next(input_pipeline.TrainIterator(config.input, seed=config.seed))
    init = jax.jit(task_module.Task(config).init_params)(init_rng, batch)
    expected = tree.flatten(jax.device_get(init["img"]))
    got = tree.flatten(rnd.params)
    assert set(got) == set(expected)
    for path, x in expected.items():
        np.testing.assert_array_equal(got[path], np.asarray(x), err_msg=path)


def test_rerun_reuses_finished_stages(smoke, data_dir, capsys):
    before = {
        n: os.path.getmtime(os.path.join(smoke, n, "result.json")) for n, _, _ in pipeline.STAGES
    }
    assert pipeline.main(["--workdir", smoke, "--smoke", "--data_dir", data_dir]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"done before, reused", out)) == len(pipeline.STAGES)
    after = {
        n: os.path.getmtime(os.path.join(smoke, n, "result.json")) for n, _, _ in pipeline.STAGES
    }
    assert before == after

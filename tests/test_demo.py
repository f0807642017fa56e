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
    samples = _read(smoke, "caption/pretrain/run/captions/caption_samples.html")
    assert samples.count("<img ") == 16  # the whole scenes/tiny validation split


def test_smoke_overrides_reach_every_training_run(smoke):
    """`Scale.run` (the smoke's log_flops=False) is in every run's config and no run logged MFU."""
    from transfer import metrics

    runs = [d for d, _, files in os.walk(smoke) if "metrics.jsonl" in files]
    assert len(runs) >= 14
    for run in runs:
        with open(os.path.join(run, "config.json")) as f:
            assert json.load(f)["log_flops"] is False, run
        rows = metrics.read_jsonl(os.path.join(run, "metrics.jsonl"))
        assert not any("perf/mfu" in r for r in rows), run


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
    compared = [r for r in headline if r["verdict"] is not None]
    assert (
        verdict["rows"] == len(compared) == len(headline)
    )  # every transfer has its random-tower twin
    assert verdict["won"] == sum(r["verdict"] == "won" for r in compared)
    assert report.verdict_text(verdict) in md
    lines = md.splitlines()
    for row in headline:  # each row appears verbatim, formatted from summary.json
        cells = [row["transfer"], row["metric"], *(report.cell(row, t) for t in report.TOWERS)]
        assert any(all(f"| {c} |" in line for c in cells) for line in lines), row
    # The few-shot rows come from the probe reports of the three towers: mean and std over seeds.
    row = next(r for r in headline if r["metric"] == "2-shot top-1")
    for tower in report.TOWERS:
        probe = json.loads(_read(smoke, f"fewshot/{tower}/fewshot.json"))
        digits = probe["datasets"]["digits"]["shots"]["2"]
        assert (row[tower], row[f"{tower}_std"]) == (digits["mean"], digits["std"])
    # The caption rows: each init's own run; the baseline is the constant caption's score.
    cider = next(r for r in headline if r["metric"] == "CIDEr")
    stages = summary["stages"]["caption"]
    assert (cider["pretrain"], cider["baseline"]) == (
        stages["pretrain"]["final"]["caption/CIDEr"],
        stages["pretrain"]["final"]["caption/baseline/CIDEr"],
    )
    assert cider["random_tower"] == stages["random_tower"]["final"]["caption/CIDEr"]
    siglit = siglit_row(headline)
    assert cider["supervised"] is None and siglit["supervised"] is None  # CapPa runs only
    siglit_runs = summary["stages"]["siglit"]
    assert siglit["random_tower"] == siglit_runs["random_tower"]["final"]["zeroshot/prec@1"]
    mapped = next(r for r in headline if r["transfer"].startswith("MAP probe"))
    assert (
        mapped["supervised"]
        == summary["stages"]["map_probe"]["supervised"]["final"]["probe/prec@1"]
    )
    html = _read(smoke, "report.html")
    assert html.count("data:image/png;base64,") >= 4 and report.cell(cider, "pretrain") in html


def siglit_row(headline):
    return next(r for r in headline if r["metric"] == "zero-shot top-1")


def test_verdict_needs_a_gap_larger_than_the_spread():
    def row(pre, rnd, std=None, lower=False):
        values = {
            "pretrain": (pre, std) if std else pre,
            "random_tower": (rnd, std) if std else rnd,
        }
        return report._row("t", "m", values, None, "-", lower_is_better=lower)["verdict"]

    assert row(0.5, 0.4) == "won" and row(0.4, 0.5) == "lost" and row(0.5, 0.5) == "within spread"
    assert row(0.50, 0.40, std=0.05) == "won"  # gap 0.10 > hypot(0.05, 0.05) = 0.071
    assert row(0.50, 0.44, std=0.05) == "within spread"
    assert row(0.2, 0.3, lower=True) == "won"  # e.g. OCR's character error rate


def test_supervised_tower_has_the_pretrained_shape_and_budget(smoke):
    from pretrain import features

    sup = features.load_tower(os.path.join(smoke, "supervised", "run"))
    pre = features.load_tower(os.path.join(smoke, "pretrain", "run"))
    assert {k: v for k, v in sup.vit_kw.items() if k != "pool_type"} == {
        k: v for k, v in pre.vit_kw.items() if k != "pool_type"
    }
    assert sup.step == pre.step > 0


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

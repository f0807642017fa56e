"""Caption fine-tunes through the one loop: the task beats a constant caption on CIDEr, a frozen tower stays
bit-identical, sharded decoding in the evaluator equals single-device decoding, and the files it writes."""

import base64
import io
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from helpers import fit_recipe, tiny_cappa_model

from tasks import caption, caption_eval, caption_metrics, generation_eval, report_utils
from transfer import config as config_lib
from transfer import metrics, train

STEPS = 200  # enough for the tiny model to fit the split it is scored on

MAX_LEN = 40
IMAGE_PP = "decode|resize(32)|value_range(-1, 1)"
METRICS = ("bleu", "rouge", "cider")  # no METEOR/SPICE: their Java start-up is slow


def caption_config(data_dir, tokenizer, **overrides):
    c = ml_collections.ConfigDict()
    c.task = "tasks.caption"
    c.tokenizer = tokenizer.path
    c.input = dict(
        # The 16 images it is scored on: a test-sized model fits them in seconds, which is enough to
        # prove training + decoding + scoring end to end (generalisation is the demo's to show).
        data=dict(name="scenes/tiny", split="validation", data_dir=data_dir),
        batch_size=16,
        pp=(
            f"{IMAGE_PP}|flatten|choice(key='captions/text', outkey='text')"
            f"|tokenize(max_len={MAX_LEN}, model='{tokenizer.path}', key='text', outkey='labels')"
            "|keep('image', 'labels')"
        ),
        shuffle_buffer_size=64,
    )
    c.model = tiny_cappa_model(tokenizer.vocab_size, MAX_LEN)
    c.update(fit_recipe(STEPS, overrides.pop("schedule", None)))
    c.evals = dict(
        caption=dict(
            type="caption",
            data=dict(split="validation"),
            pp=IMAGE_PP,
            batch_size=16,
            metrics=METRICS,
            constant_baseline=True,
            num_samples=4,
        ),
        val=dict(type="perplexity", data=dict(split="validation"), batch_size=16),
    )
    c.update(overrides)
    config, _ = train.prepare_config(config_lib.merge_with_defaults(c, caption.DEFAULTS))
    return config


@pytest.fixture(scope="module")
def scratch_run(data_dir, scenes_tokenizer, tmp_path_factory):
    """Both towers trained from scratch on the 16 `scenes/tiny` validation images (8 devices)."""
    config = caption_config(data_dir, scenes_tokenizer)
    workdir = str(tmp_path_factory.mktemp("caption_run"))
    result = train.train(config, workdir)
    return workdir, result, config


def _rows(workdir):
    return metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_caption_task_beats_constant_caption(scratch_run):
    workdir, result, _ = scratch_run
    rows = _rows(workdir)
    start, final = rows[0], result.metrics
    assert start["step"] == 0  # eval_at_start: the untrained model's row
    assert final["train/pa_fraction"] == 0.0  # captioning only
    # The constant caption is the most frequent training caption, scored on the same references.
    assert final["caption/CIDEr"] > 3 * final["caption/baseline/CIDEr"]
    assert final["caption/CIDEr"] > 2 * start["caption/CIDEr"]
    assert final["caption/baseline/CIDEr"] == start["caption/baseline/CIDEr"]
    assert final["caption/images"] == 16


def test_written_predictions_rescore_to_the_logged_metrics(scratch_run, data_dir):
    workdir, result, config = scratch_run
    folder = os.path.join(workdir, "captions")
    preds = caption_metrics.read_coco_results(os.path.join(folder, f"caption_step{STEPS}.json"))
    assert len(preds) == 16 and os.path.isfile(os.path.join(folder, "caption_step0.json"))
    data = dict(config.input.data, split="validation")
    refs = caption_eval.read_references(data, "captions/text", "image/id", 5)
    scores = caption_metrics.score(refs, preds, metrics=METRICS)["scores"]
    assert scores["CIDEr"] == pytest.approx(result.metrics["caption/CIDEr"], abs=1e-9)
    # The samples page shows the generated captions and the references (HTML-escaped).
    page = open(os.path.join(folder, "caption_samples.html"), encoding="utf-8").read()
    assert page.count("<img ") == 4
    some_id = next(iter(preds))
    assert f"id {some_id}" in page or page.count("<b>") == 4
    # caption.md reports the final metrics next to the constant caption, and the step-0 values.
    report = open(os.path.join(workdir, "caption.md")).read()
    assert f"{result.metrics['caption/CIDEr']:.4f}" in report
    assert f"{result.metrics['caption/baseline/CIDEr']:.4f}" in report
    assert f"{result.metrics['val/loss']:.4f}" in report  # the collapse table: before/after


def test_evaluator_decodes_as_single_device_greedy(scratch_run, scenes_tokenizer, data_dir):
    """The evaluator's sharded decoding (8 devices, gathered) gives decode.captions' captions."""
    from pretrain import decode
    from transfer import input_pipeline

    workdir, result, config = scratch_run
    preds = caption_metrics.read_coco_results(
        os.path.join(workdir, "captions", f"caption_step{STEPS}.json")
    )
    task = caption.Task(config)
    cfg = {
        "data": dict(config.input.data, split="validation"),
        "pp": IMAGE_PP + "|keep('image', 'image/id')",
    }
    batch = next(
        iter(input_pipeline.eval_batches(cfg, batch_size=16, process_index=0, process_count=1))
    )
    params = jax.device_put(result.params, jax.devices()[0])
    out = decode.captions(task.model, params, batch["image"], scenes_tokenizer, max_len=MAX_LEN)
    expected = {int(i): t[0] for i, t in zip(batch["image/id"], out["text"], strict=True)}
    assert preds == expected


@pytest.fixture(scope="module")
def frozen_run(scratch_run, data_dir, scenes_tokenizer, tmp_path_factory):
    """The LiT-decoder protocol: the scratch run's tower loaded and frozen, a new decoder."""
    init_dir = scratch_run[0]
    config = caption_config(
        data_dir,
        scenes_tokenizer,
        total_steps=4,
        ckpt_steps=4,
        model_init=init_dir,
        model_load=dict(dont_load=["txt/.*"]),
        schedule=[("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=1))],
    )
    config.evals = dict(val=dict(type="perplexity", data=dict(split="validation"), batch_size=16))
    workdir = str(tmp_path_factory.mktemp("caption_frozen"))
    return train.train(config, workdir), workdir


def test_frozen_tower_is_bit_identical_and_decoder_is_new(scratch_run, frozen_run):
    before = scratch_run[1].params
    after, workdir = frozen_run
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
        before["img"],
        after.params["img"],
    )
    assert all(jax.tree.leaves(same))
    txt_changed = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
        before["txt"],
        after.params["txt"],
    )
    assert all(jax.tree.leaves(txt_changed))  # not loaded (dont_load) and trained
    rows = _rows(workdir)
    # Collapse table: step-0 row of the loaded weights vs the last row.
    table = report_utils.collapse_rows(rows, ["val"])
    assert {r["metric"] for r in table} == {"val/loss", "val/perplexity"}
    first = next(r for r in rows if r["step"] == 0)
    assert next(r for r in table if r["metric"] == "val/loss")["before"] == first["val/loss"]


def test_collapse_rows_pair_step0_with_last_values():
    rows = [
        {"step": 0, "fs/5shot": 0.5, "fs/seconds": 3.0, "zs/prec@1": 0.4, "other/x": 1.0},
        {"step": 10, "fs/5shot": 0.45, "train/loss": 1.0},
        {"step": 20, "fs/5shot": 0.3, "zs/prec@1": 0.1},
    ]
    table = report_utils.collapse_rows(rows, ["fs", "zs"])
    assert table == [
        dict(metric="fs/5shot", before=0.5, after=0.3, change=pytest.approx(-0.2)),
        dict(metric="zs/prec@1", before=0.4, after=0.1, change=pytest.approx(-0.3)),
    ]


def test_references_and_bad_keys(data_dir):
    import tensorflow_datasets as tfds

    data = dict(name="scenes/tiny", split="validation", data_dir=data_dir)
    refs = caption_eval.read_references(data, "captions/text", "image/id", 5)
    ds = tfds.load("scenes/tiny", split="validation", data_dir=data_dir)
    expected = {
        int(ex["image/id"]): [t.decode() for t in ex["captions"]["text"]]
        for ex in tfds.as_numpy(ds)
    }
    assert refs == expected
    with pytest.raises(ValueError, match="identify images"):
        caption_eval.read_references(data, "captions/text", "count", 5)
    with pytest.raises(Exception, match="first_texts"):
        caption_eval.read_references(data, "captions/txt", "image/id", 5)
    constant = caption_eval.most_frequent_caption(dict(data, split="train"), "captions/text")
    counts = {}
    for ex in tfds.as_numpy(tfds.load("scenes/tiny", split="train", data_dir=data_dir)):
        for t in ex["captions"]["text"]:
            counts[t.decode()] = counts.get(t.decode(), 0) + 1
    assert counts[constant] == max(counts.values())


def test_samples_page_embeds_images_and_escapes_text():
    from PIL import Image

    image = np.linspace(-1, 1, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    page = generation_eval.samples_html(
        [(image, 7)], {7: "a <red> circle"}, {7: ["ref & one", "ref two"]}, title="t"
    )
    assert "<b>a &lt;red&gt; circle</b>" in page and "ref &amp; one" in page
    uri = page.split('src="')[1].split('"')[0]
    png = base64.b64decode(uri.split(",", 1)[1])
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(
        decoded, np.clip((image + 1) * 127.5, 0, 255).round().astype(np.uint8)
    )


def test_config_args_build_the_protocols():
    from transfer.config import load_config_module

    caption_coco = load_config_module("configs/caption_coco.py")
    frozen = caption_coco.get_config()
    assert frozen.schedule[0] == ("img/.*", None) and frozen.model_load.dont_load == []
    lit = caption_coco.get_config("decoder=scratch")
    assert lit.model_load.dont_load == ["txt/.*"]
    mult = caption_coco.get_config("tower=0.1")
    assert list(mult.lr_mults) == [("img/.*", 0.1)] and mult.schedule.decay_type == "cosine"
    coco = caption_coco.get_config("data=coco")
    assert coco.input.data.name == "coco_captions" and coco.evals.caption_test.data.split == "test"
    assert "resize(224)" in coco.input.pp and json.dumps(coco.to_dict())
    with pytest.raises(ValueError, match="tower="):
        caption_coco.get_config("tower=half")


def test_cappa_caption_reads_a_finetuned_run(scratch_run, scenes_tokenizer, tmp_path, capsys):
    """`cappa caption` on the caption task's workdir: the checkpoint's weights, greedy, as decode.captions."""
    from PIL import Image

    from pretrain import caption as caption_cli
    from pretrain import decode, runs

    workdir, result, config = scratch_run
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    assert caption_cli.main(["--checkpoint", workdir, *paths, "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    images = runs.load_images(paths, 32)
    params = jax.device_put(result.params, jax.devices()[0])
    task = caption.Task(config)
    out = decode.captions(task.model, params, images, scenes_tokenizer, max_len=MAX_LEN)
    assert [p["captions"][0]["text"] for p in printed] == [t[0] for t in out["text"]]

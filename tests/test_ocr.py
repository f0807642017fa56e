"""OCR through the one loop: the task reads the embedded word strips better than the most frequent text, the
predictions file re-scores to the logged metrics, `fold` keeps every pixel, and a frozen tower stays put."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from helpers import fit_recipe, tiny_cappa_model

from tasks import ocr, ocr_metrics, ocr_pp
from transfer import config as config_lib
from transfer import metrics, train

STEPS = 150  # enough for the tiny model to fit the split it is scored on

MAX_LEN = 16
IMAGE_PP = "decode|fold(2)|resize(32)|value_range(-1, 1)"


@pytest.fixture(scope="module")
def ocr_tokenizer(data_dir, tmp_path_factory):
    """BPE on the lower-cased texts of `scenes_ocr/tiny` (every letter they use)."""
    from transfer import tokenizer

    data = {"name": "scenes_ocr/tiny", "split": "train", "data_dir": data_dir}
    texts = [t.lower() for t in tokenizer.captions_from_dataset(data, "text")]
    texts += [
        t.lower() for t in tokenizer.captions_from_dataset(dict(data, split="validation"), "text")
    ]
    path = str(tmp_path_factory.mktemp("ocr_tok") / "ocr.model")
    return tokenizer.train_tokenizer(texts, path, vocab_size=100, model_type="bpe")


def ocr_config(data_dir, tok, **overrides):
    c = ml_collections.ConfigDict()
    c.task = "tasks.ocr"
    c.tokenizer = tok.path
    c.pp_modules = ["tasks.ocr_pp"]
    c.input = dict(
        # The 16 strips it is scored on: a test-sized model fits them in seconds, which proves training +
        # decoding + scoring end to end (reading unseen words is the demo's to show).
        data=dict(name="scenes_ocr/tiny", split="validation", data_dir=data_dir),
        batch_size=16,
        pp=(
            f"{IMAGE_PP}|lowercase(key='text')"
            f"|tokenize(max_len={MAX_LEN}, model='{tok.path}', key='text', outkey='labels')"
            "|keep('image', 'labels')"
        ),
        shuffle_buffer_size=64,
    )
    c.model = tiny_cappa_model(tok.vocab_size, MAX_LEN)
    c.update(fit_recipe(STEPS, overrides.pop("schedule", None)))
    c.evals = dict(
        ocr=dict(
            type="ocr",
            data=dict(split="validation"),
            pp=IMAGE_PP,
            batch_size=16,
            ignore_case=True,
            num_samples=4,
        ),
        val=dict(type="perplexity", data=dict(split="validation"), batch_size=16),
    )
    c.update(overrides)
    config, _ = train.prepare_config(config_lib.merge_with_defaults(c, ocr.DEFAULTS))
    return config


@pytest.fixture(scope="module")
def ocr_run(data_dir, ocr_tokenizer, tmp_path_factory):
    config = ocr_config(data_dir, ocr_tokenizer)
    workdir = str(tmp_path_factory.mktemp("ocr_run"))
    return workdir, train.train(config, workdir), config


def test_ocr_task_beats_the_most_frequent_text(ocr_run):
    workdir, result, _ = ocr_run
    start = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))[0]
    final = result.metrics
    assert start["step"] == 0 and final["ocr/images"] == 16
    assert final["ocr/reachable"] == 1.0  # the test tokenizer writes every lower-cased text
    assert final["ocr/exact_match"] >= final["ocr/baseline/exact_match"] + 0.5
    assert final["ocr/anls"] >= final["ocr/baseline/anls"] + 0.5
    assert (
        final["ocr/cer"] < 0.5 * final["ocr/baseline/cer"] and final["ocr/cer"] < start["ocr/cer"]
    )


def test_predictions_rescore_to_the_logged_metrics(ocr_run):
    import tensorflow_datasets as tfds

    workdir, result, config = ocr_run
    preds = ocr.read_predictions(os.path.join(workdir, "ocr", f"ocr_step{STEPS}.json"))
    ds = tfds.load("scenes_ocr/tiny", split="validation", data_dir=config.input.data.data_dir)
    refs = {int(ex["image/id"]): ex["text"].decode() for ex in tfds.as_numpy(ds)}
    assert set(preds) == set(refs)
    ids = sorted(preds)
    scores = ocr_metrics.score(
        [preds[i] for i in ids], [refs[i] for i in ids], ignore_case=True, normalize_whitespace=True
    )
    for key in ("exact_match", "cer", "anls"):
        assert scores[key] == pytest.approx(result.metrics[f"ocr/{key}"], abs=1e-12)
    train_texts = [
        ex["text"].decode() for ex in tfds.as_numpy(ds)
    ]  # training split = validation here
    counts = {t: train_texts.count(t) for t in train_texts}
    base = ocr_metrics.score(
        [max(counts, key=counts.get)] * 16,
        [refs[i] for i in ids],
        ignore_case=True,
        normalize_whitespace=True,
    )
    assert base["cer"] == pytest.approx(result.metrics["ocr/baseline/cer"])
    page = open(os.path.join(workdir, "ocr", "ocr_samples.html"), encoding="utf-8").read()
    assert page.count("<img ") == 4
    report = open(os.path.join(workdir, "ocr.md")).read()
    assert f"{result.metrics['ocr/exact_match']:.4f}" in report
    assert f"{result.metrics['val/loss']:.4f}" in report  # collapse table


def test_fold_keeps_every_pixel_in_reading_order():
    import tensorflow as tf

    strip = np.arange(32 * 128 * 3, dtype=np.int32).reshape(32, 128, 3)
    folded = ocr_pp.get_fold(2)({"image": tf.constant(strip)})["image"].numpy()
    assert folded.shape == (64, 64, 3)
    np.testing.assert_array_equal(folded[:32], strip[:, :64])
    np.testing.assert_array_equal(folded[32:], strip[:, 64:])
    assert ocr_pp.get_lowercase()({"text": tf.constant("ZeBra")})["text"].numpy() == b"zebra"


def test_frozen_tower_is_bit_identical(ocr_run, data_dir, ocr_tokenizer, tmp_path):
    config = ocr_config(
        data_dir,
        ocr_tokenizer,
        total_steps=2,
        ckpt_steps=2,
        model_init=ocr_run[0],
        schedule=[("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=1))],
    )
    config.evals = {}
    after = train.train(config, str(tmp_path)).params
    before = ocr_run[1].params
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), before["img"], after["img"]
    )
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(before["txt"]["head"]["bias"], after["txt"]["head"]["bias"])


def test_config_args(tmp_path):
    ocr_config_file = config_lib.load_config_module("configs/ocr.py")
    vqa_config_file = config_lib.load_config_module("configs/vqa.py")

    scenes = ocr_config_file.get_config()
    assert "fold(2)" in scenes.input.pp and "lowercase" in scenes.input.pp
    assert scenes.evals.ocr.ignore_case and scenes.schedule[0] == ("img/.*", None)
    resized = ocr_config_file.get_config("strip=resize,case=keep,tower=0.1")
    assert "fold" not in resized.input.pp and not resized.evals.ocr.ignore_case
    assert list(resized.lr_mults) == [("img/.*", 0.1)]
    text = vqa_config_file.get_config("data=textvqa_files")
    assert text.input.data.name == "textvqa_files" and text.evals.vqa.answers_key == "answers"
    assert "majority_answer" in vqa_config_file.get_config("answer=majority").input.pp
    assert json.dumps(text.to_dict()) and vqa_config_file.get_config().spell_numbers
    with pytest.raises(ValueError, match="strip="):
        ocr_config_file.get_config("strip=pad")

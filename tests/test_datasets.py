"""Embedded datasets: generated offline, deterministic, with labels that match the pixels."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import transfer.datasets
from transfer.datasets import digits, render, scenes, scenes_ocr, scenes_vqa
from transfer.datasets.render import SplitSizesConfig

SPLITS = ("train", "validation", "test")
RENDERED = ("scenes", "scenes_vqa", "scenes_ocr")  # The builders with `tiny` configs.


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [v.decode() for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _load(builder: tfds.core.DatasetBuilder, split: str) -> list[dict]:
    """All examples of a split as Python values, sorted by image id."""
    examples = [_decode(ex) for ex in tfds.as_numpy(builder.as_dataset(split=split))]
    return sorted(examples, key=lambda ex: int(ex["image/id"]))


def _prepare(name: str, data_dir, config="tiny") -> tfds.core.DatasetBuilder:
    builder = tfds.builder(name, data_dir=str(data_dir), config=config)
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def built(data_dir) -> dict[str, dict[str, list[dict]]]:
    """Every rendered dataset, tiny config, loaded: {name: {split: examples}}."""
    return {
        name: {split: _load(_prepare(name, data_dir), split) for split in SPLITS}
        for name in RENDERED
    }


def test_embedded_names_are_registered():
    assert transfer.datasets.EMBEDDED == RENDERED + ("digits",)
    for name in transfer.datasets.EMBEDDED:  # 2.0.0: the rendered scenes gained their variation
        version = "1.0.0" if name == "digits" else "2.0.0"
        assert tfds.builder_cls(name).VERSION == tfds.core.Version(version)


def test_split_sizes_follow_the_config(built, data_dir):
    tiny = {"train": 64, "validation": 16, "test": 16}
    for name, splits in built.items():
        assert {split: len(examples) for split, examples in splits.items()} == tiny
        info = tfds.builder(name, data_dir=str(data_dir), config="tiny").info
        assert info.splits["train"].num_examples == 64
    assert tfds.builder("scenes", data_dir=str(data_dir)).builder_config.sizes() == {
        "train": 5000,
        "validation": 500,
        "test": 500,
    }


def test_two_builds_are_identical(built, tmp_path):
    again = _prepare("scenes", tmp_path / "again")
    for split in SPLITS:
        for a, b in zip(built["scenes"][split], _load(again, split), strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            assert a["captions"]["text"] == b["captions"]["text"]
            assert a["label"] == b["label"]


def test_custom_split_sizes_give_the_same_examples(built, tmp_path):
    """An example depends only on (dataset, split, index): a smaller build is a prefix."""
    config = SplitSizesConfig(name="small", train=5, validation=2, test=1)
    small = _prepare("scenes", tmp_path / "small", config=config)
    reference = {ex["image/id"]: ex for ex in built["scenes"]["train"]}
    examples = _load(small, "train")
    assert [ex["image/id"] for ex in examples] == list(range(5))
    for ex in examples:
        np.testing.assert_array_equal(ex["image"], reference[ex["image/id"]]["image"])


def test_scene_images_and_ids(built):
    ids = set()
    for split, examples in built["scenes"].items():
        for ex in examples:
            assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
            assert ex["image"].std() > 5.0
            assert ex["image/filename"].startswith(split)
            ids.add(ex["image/id"])
    assert len(ids) == sum(len(examples) for examples in built["scenes"].values())
    train0, val0 = built["scenes"]["train"][0]["image"], built["scenes"]["validation"][0]["image"]
    assert not np.array_equal(train0, val0)


def test_labels_describe_the_main_object(built):
    for ex in built["scenes"]["train"]:
        objects = ex["objects"]
        sizes = [render.SIZES[s] for s in objects["size"]]
        assert sizes[0] == "large" and sizes.count("large") == 1
        assert ex["shape"] == objects["shape"][0] and ex["color"] == objects["color"][0]
        assert ex["label"] == ex["shape"] * len(render.COLOR_NAMES) + ex["color"]
        assert scenes.LABEL_NAMES[ex["label"]] == (
            f"{render.COLOR_NAMES[ex['color']]} {render.SHAPES[ex['shape']]}"
        )
        assert ex["count"] + 1 == len(objects["shape"])


def test_captions_are_distinct_and_mention_the_label(built):
    for ex in built["scenes"]["train"]:
        texts = ex["captions"]["text"]
        assert len(texts) == scenes.NUM_CAPTIONS == len(set(texts))
        assert len(set(ex["captions"]["id"])) == len(texts)
        color, shape = render.COLOR_NAMES[ex["color"]], render.SHAPES[ex["shape"]]
        for text in texts:
            assert color in text and shape in text, text


def test_label_distribution_is_not_degenerate(built):
    train = built["scenes"]["train"]
    labels = collections.Counter(ex["label"] for ex in train)
    assert len(labels) >= 15
    assert max(labels.values()) <= len(train) // 4
    assert {ex["count"] for ex in train} == {0, 1, 2, 3}
    assert len({ex["shape"] for ex in train}) == len(render.SHAPES)
    assert len({ex["color"] for ex in train}) == len(render.COLOR_NAMES)


def _expected_answer(question: str, objects: dict) -> str | None:
    """Recompute the answer of counting and existence questions from `objects`."""
    shapes = [render.SHAPES[i] for i in objects["shape"]]
    colors = [render.COLOR_NAMES[i] for i in objects["color"]]
    if question == "how many shapes are there?":
        return str(len(shapes))
    if match := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(colors.count(match[1]))
    if match := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(scenes.plural(s) == match[1] for s in shapes))
    if match := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if (match[1], match[2]) in set(zip(colors, shapes, strict=True)) else "no"
    return None


def test_vqa_answers(built):
    checked = collections.Counter()
    for examples in built["scenes_vqa"].values():
        for ex in examples:
            assert len(ex["answers"]) == scenes_vqa.NUM_ANSWERS
            assert ex["answer_type"] in scenes_vqa.ANSWER_TYPES
            assert ex["question"].endswith("?") and ex["question"].startswith(ex["question_type"])
            assert ex["image"].shape == (64, 64, 3)
            majority, votes = collections.Counter(ex["answers"]).most_common(1)[0]
            assert votes >= 6
            expected = _expected_answer(ex["question"], ex["objects"])
            if expected is not None:
                assert majority == expected, (ex["question"], ex["answers"])
                checked[ex["answer_type"]] += 1
    assert checked["number"] >= 10 and checked["yes/no"] >= 3
    assert len({ex["question_type"] for ex in built["scenes_vqa"]["train"]}) >= 5


def test_vqa_answers_show_some_disagreement(built):
    examples = built["scenes_vqa"]["train"]
    assert any(len(set(ex["answers"])) > 1 for ex in examples)
    assert any(len(set(ex["answers"])) == 1 for ex in examples)


def test_ocr_images_show_their_text(built):
    images = {}
    for examples in built["scenes_ocr"].values():
        for ex in examples:
            assert ex["text"].strip() == ex["text"] and ex["text"]
            assert all(word.lower() in scenes_ocr.WORDS for word in ex["text"].split())
            assert ex["image"].shape == (32, 128, 3) and ex["image"].dtype == np.uint8
            assert ex["image"].astype(np.float32).var() > 20.0
            images.setdefault(ex["text"], ex["image"])
    texts = sorted(images)
    assert len(texts) > 50
    for a, b in zip(texts, texts[1:], strict=False):
        assert not np.array_equal(images[a], images[b])


def test_ocr_rendering_depends_on_the_text():
    """Same seed, same size, different words: the glyphs change the pixels."""
    first = scenes_ocr.render_text("cat", 16, np.random.default_rng(0))
    second = scenes_ocr.render_text("dog", 16, np.random.default_rng(0))
    assert np.abs(first.astype(int) - second.astype(int)).max() > 50


# ---------------------------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits_built(data_dir) -> dict[str, list[dict]]:
    """Both splits of `digits` in stored order (the permutation order)."""
    builder = _prepare("digits", data_dir, config=None)
    return {
        split: list(tfds.as_numpy(builder.as_dataset(split=split))) for split in ("train", "test")
    }


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_digits_split_sizes(digits_built, data_dir):
    assert {split: len(examples) for split, examples in digits_built.items()} == {
        "train": 1297,
        "test": 500,
    }
    splits = tfds.builder("digits", data_dir=str(data_dir)).info.splits
    assert splits["train"].num_examples == 1297 and splits["test"].num_examples == 500


def test_digits_permutation_is_fixed():
    """Known answer: the permutation must not depend on the machine or the numpy version."""
    order = digits.split_permutation()
    assert order[:6].tolist() == [1081, 1707, 927, 713, 262, 182]
    assert order[-3:].tolist() == [1653, 559, 684]
    assert sorted(order.tolist()) == list(range(1797))
    np.testing.assert_array_equal(order, digits.split_permutation())


def test_digits_equal_sklearn_through_the_permutation(digits_built, sklearn_digits):
    order = digits.split_permutation()
    expected_rows = {"train": order[500:], "test": order[:500]}
    for split, examples in digits_built.items():
        rows = np.array([ex["index"] for ex in examples])
        np.testing.assert_array_equal(rows, expected_rows[split])
        labels = np.array([ex["label"] for ex in examples])
        np.testing.assert_array_equal(labels, sklearn_digits.target[rows])
        images = np.stack([ex["image"] for ex in examples])
        assert images.shape == (len(examples), 8, 8, 3) and images.dtype == np.uint8
        grey = np.round(sklearn_digits.images[rows] * 255 / 16)  # counts 0..16 -> 0..255
        for channel in range(3):
            np.testing.assert_array_equal(images[..., channel], grey)
    assert set(expected_rows["train"]).isdisjoint(expected_rows["test"])


def test_digits_every_class_in_both_splits(digits_built):
    for split, examples in digits_built.items():
        counts = collections.Counter(int(ex["label"]) for ex in examples)
        assert sorted(counts) == list(range(10))
        assert min(counts.values()) >= (40 if split == "test" else 110), (split, counts)


def test_digits_rejects_counts_out_of_range():
    with pytest.raises(ValueError, match="0..16"):
        digits.to_image(np.full(64, 17))

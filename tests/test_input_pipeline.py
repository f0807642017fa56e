"""Input pipeline on tiny local TFDS datasets: determinism, resume, sharding, bad images."""

import collections
import io
import itertools
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from transfer import input_pipeline as ip
from transfer import pp as pp_lib
from transfer.config import ConfigError

N_TRAIN, N_TEST = 40, 13
PP = "decode|keep('image', 'label', 'id')"
PP_RANDOM = "decode|random_crop(8)|flip_lr|value_range(-1, 1)|keep('image', 'id')"
PP_CACHED = (
    "decode|cappa_test_count|cache|random_crop(8)|flip_lr|value_range(-1, 1)|keep('image', 'id')"
)
PREFIX_CALLS = collections.Counter()  # id -> how often the `cappa_test_count` op ran on it


@pp_lib.register("cappa_test_count")
def get_cappa_test_count():
    """Counts per example id how often it runs (a deterministic op, like decoding)."""

    def count(i):
        PREFIX_CALLS[int(i)] += 1
        return i

    def op(example):
        return {**example, "id": tf.numpy_function(count, [example["id"]], example["id"].dtype)}

    return op


def _pixels(i, shape=(16, 16, 3)):
    return np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)


def _encode(array, fmt, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return buffer.getvalue()


# Raw-bytes examples: kind -> (bytes for id i, is_bad, is_converted).
KINDS = {
    "png": (lambda i: _encode(_pixels(i), "PNG"), False, False),
    "jpeg": (lambda i: _encode(_pixels(i), "JPEG"), False, False),
    "truncated": (lambda i: _encode(_pixels(i), "JPEG")[:200], True, False),
    "garbage": (lambda i: b"not an image at all", True, False),
    "gray": (lambda i: _encode(_pixels(i, (16, 16)), "PNG"), False, True),
    "rgba": (lambda i: _encode(_pixels(i, (16, 16, 4)), "PNG"), False, True),
    "cmyk": (lambda i: _encode(_pixels(i, (16, 16, 4)), "JPEG", "CMYK"), False, True),
}
N_RAW = 28


def _kind(i):
    return list(KINDS)[i % len(KINDS)]


class CappaTestImages(tfds.core.GeneratorBasedBuilder):
    """Good 16x16 RGB images; the pixels are a function of `id`."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(16, 16, 3)),
                    "label": tfds.features.ClassLabel(num_classes=4),
                    "id": tf.int64,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(N_TRAIN)),
            "test": self._generate_examples(range(100, 100 + N_TEST)),
        }

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"image": _pixels(i), "label": i % 4, "id": i}


class CappaTestRaw(tfds.core.GeneratorBasedBuilder):
    """Encoded bytes of every kind: good, corrupt, grayscale, RGBA and CMYK."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=tf.string),
                    "id": tf.int64,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(N_RAW):
            yield i, {"image": KINDS[_kind(i)][0](i), "id": i}


class CappaTestUnprepared(CappaTestImages):
    """Registered but never prepared."""


class CappaTestManual(CappaTestImages):
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download tiny.zip from the example site."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    for builder_cls in (CappaTestImages, CappaTestRaw):
        builder_cls(data_dir=path).download_and_prepare()
    return path


def _cfg(data_dir, name="cappa_test_images", split="train", pp=PP, batch_size=8, **kw):
    return {
        "data": {"name": name, "split": split, "data_dir": data_dir},
        "pp": pp,
        "batch_size": batch_size,
        **kw,
    }


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _ids(batches):
    return [int(i) for b in batches for i in b["id"]]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- datasets


def test_num_examples_per_host(data_dir):
    data = ml_collections.ConfigDict(
        {"name": "cappa_test_images", "split": "train", "data_dir": data_dir}
    )
    assert ip.num_examples(data) == N_TRAIN  # jax defaults: one process.
    assert [ip.num_examples(data, i, 3) for i in range(3)] == [14, 13, 13]
    data.split = "train[:10]+test"
    assert ip.num_examples(data, 0, 1) == 10 + N_TEST


def test_unprepared_dataset_fails_fast_with_build_hint(tmp_path):
    start = time.monotonic()
    with pytest.raises(ip.DataNotPreparedError) as error:
        ip.get_builder(
            {"name": "cappa_test_unprepared", "split": "train", "data_dir": str(tmp_path)}
        )
    assert time.monotonic() - start < 2
    message = str(error.value)
    assert f"tfds build cappa_test_unprepared --data_dir {tmp_path}" in message
    assert "input.data.data_dir" in message
    with pytest.raises(ip.DataNotPreparedError, match="Download tiny.zip"):
        ip.TrainIterator(
            _cfg(str(tmp_path), name="cappa_test_manual"), seed=0, process_index=0, process_count=1
        )


def test_unknown_dataset_names_close_ones(tmp_path):
    with pytest.raises(ip.DataNotPreparedError, match="cappa_test_images"):
        ip.get_builder({"name": "cappa_test_imagez", "split": "train", "data_dir": str(tmp_path)})


def test_batch_size_must_divide_over_processes(data_dir):
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        ip.TrainIterator(_cfg(data_dir, batch_size=6), seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        ip.eval_batches(_cfg(data_dir), batch_size=6, process_index=0, process_count=4)


def test_pp_failing_everywhere_raises_instead_of_spinning(data_dir):
    with pytest.raises(ValueError, match="start the pp with `decode`"):
        ip.TrainIterator(
            _cfg(data_dir, pp="value_range(-1, 1)"), seed=0, process_index=0, process_count=1
        )


# ----------------------------------------------------------------------------- training


def _train(data_dir, seed=0, start_position=0, index=0, count=1, **kw):
    return ip.TrainIterator(
        _cfg(data_dir, **kw),
        seed=seed,
        start_position=start_position,
        process_index=index,
        process_count=count,
    )


def test_batches_are_numpy_without_internal_keys(data_dir):
    batch = next(_train(data_dir))
    assert sorted(batch) == ["id", "image", "label"]
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.uint8
    for image, i in zip(batch["image"], batch["id"], strict=True):
        np.testing.assert_array_equal(image, _pixels(i))


def test_epochs_are_permutations_and_seeded(data_dir):
    ids = _ids(_take(_train(data_dir, seed=1), 10))
    assert sorted(ids[:N_TRAIN]) == list(range(N_TRAIN))
    assert sorted(ids[N_TRAIN:]) == list(range(N_TRAIN))
    assert ids[:N_TRAIN] != ids[N_TRAIN:]  # Each epoch has its own order.
    assert _ids(_take(_train(data_dir, seed=1), 10)) == ids
    assert _ids(_take(_train(data_dir, seed=2), 10)) != ids


def test_order_ignores_the_global_tf_seed(data_dir):
    ids = _ids(_take(_train(data_dir, seed=1), 5))
    try:
        tf.random.set_seed(1234)
        assert _ids(_take(_train(data_dir, seed=1), 5)) == ids
    finally:
        tf.random.set_seed(None)


def test_no_shuffle_reads_in_a_fixed_order(data_dir):
    ids = _ids(_take(_train(data_dir, shuffle_buffer_size=0), 10))
    assert ids[:N_TRAIN] == ids[N_TRAIN:] and sorted(ids[:N_TRAIN]) == list(range(N_TRAIN))


# 4 and 5 batches of 8: resume across / exactly at the end of the 40-example epoch.
@pytest.mark.parametrize(
    "done, cache_raw, pp",
    [(1, False, PP_RANDOM), (4, False, PP_RANDOM), (5, True, PP_RANDOM), (4, False, PP_CACHED)],
)
def test_resume_is_bit_exact_with_random_ops(data_dir, done, cache_raw, pp):
    original = _train(data_dir, seed=3, pp=pp, cache_raw=cache_raw)
    _take(original, done)
    assert original.position == done * 8
    expected = _take(original, 3)
    resumed = _train(data_dir, seed=3, pp=pp, start_position=done * 8, cache_raw=cache_raw)
    _assert_same(_take(resumed, 3), expected)
    assert resumed.position == original.position


def test_cache_marker_keeps_the_batches_and_runs_the_prefix_once(data_dir):
    """`cache` takes no position (the random ops draw the same), and the ops before it run once
    per example over 2.4 epochs instead of on every pass."""
    PREFIX_CALLS.clear()
    uncached = _take(_train(data_dir, seed=3, pp=PP_CACHED.replace("|cache", "")), 12)
    assert sum(PREFIX_CALLS.values()) >= 96
    PREFIX_CALLS.clear()
    cached = _train(data_dir, seed=3, pp=PP_CACHED)
    assert cached.epoch_size == N_TRAIN and cached.cache_dropped == 0
    _assert_same(_take(cached, 12), uncached)
    # Every example once when the cache fills, plus the few the start-up check tries.
    assert set(PREFIX_CALLS) == set(range(N_TRAIN)) and sum(PREFIX_CALLS.values()) <= N_TRAIN + 16


def test_random_op_before_cache_is_a_config_error(data_dir):
    with pytest.raises(ConfigError, match="'flip_lr'.*before `cache`.*after `cache`"):
        _train(data_dir, pp="decode|flip_lr|cache|keep('image', 'id')")


def test_random_ops_depend_on_stream_position(data_dir):
    batches = _take(_train(data_dir, seed=3, pp=PP_RANDOM), 10)
    crops = {}
    for image, i in zip(np.concatenate([b["image"] for b in batches]), _ids(batches), strict=True):
        crops.setdefault(i, []).append(image)
    assert any(not np.array_equal(*pair) for pair in crops.values())


def test_host_slices_are_disjoint_and_cover(data_dir):
    seen = []
    for index in range(2):
        iterator = _train(data_dir, index=index, count=2)
        batches = _take(iterator, 5)  # Global batch 8 -> 4 per host; 20 examples per host.
        assert all(b["id"].shape == (4,) for b in batches)
        assert iterator.position == 20
        seen.append(set(_ids(batches)))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N_TRAIN))


# ----------------------------------------------------------------------------- bad images


def _raw_order(data_dir):
    builder = tfds.builder("cappa_test_raw", data_dir=data_dir)
    return [int(e["id"]) for e in builder.as_dataset(split="train", shuffle_files=False)]


@pytest.mark.parametrize("cached", [False, True])
def test_bad_images_skipped_and_counted(data_dir, cached):
    """Without a cache, every pass over a bad image drops it again; a cached prefix drops it once."""
    iterator = _train(
        data_dir,
        name="cappa_test_raw",
        pp="decode|cache|keep('image', 'id')" if cached else "decode|keep('image', 'id')",
        batch_size=4,
        shuffle_buffer_size=0,
    )
    batches = _take(iterator, 12)  # 48 good examples: more than two epochs of 20 good.
    stream = _raw_order(data_dir) * 3
    good = [i for i in stream if not KINDS[_kind(i)][1]]
    assert _ids(batches) == good[:48]
    bad_per_epoch = len(stream) // 3 - len(good) // 3
    if cached:  # Positions count the kept examples only.
        assert iterator.epoch_size == len(good) // 3 and iterator.cache_dropped == bad_per_epoch
        assert iterator.position == 48
        skipped = bad_per_epoch
    else:
        assert stream[iterator.position - 1] == good[47]
        skipped = sum(KINDS[_kind(i)][1] for i in stream[: iterator.position])
    converted = sum(KINDS[_kind(i)][2] for i in good[:48])
    assert iterator.stats() == {"input/skipped": skipped, "input/converted": converted}
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)


@pytest.mark.parametrize(
    "pp",
    [
        "decode|random_crop(12)|keep('image', 'id')",
        "decode|cache|random_crop(12)|keep('image', 'id')",
    ],
)
def test_resume_with_bad_images(data_dir, pp):
    kw = dict(name="cappa_test_raw", pp=pp, batch_size=4, seed=5)
    original = _train(data_dir, **kw)
    _take(original, 4)
    position, skipped = original.position, original.stats()["input/skipped"]
    assert skipped > 0
    expected = _take(original, 4)
    resumed = ip.TrainIterator(
        _cfg(data_dir, **{k: v for k, v in kw.items() if k != "seed"}),
        seed=5,
        start_position=position,
        process_index=0,
        process_count=1,
        start_skipped=skipped,
    )
    _assert_same(_take(resumed, 4), expected)
    assert resumed.stats()["input/skipped"] == original.stats()["input/skipped"]


def test_cache_marker_and_cache_raw_are_not_both_set(data_dir):
    with pytest.raises(ConfigError, match="cache_raw.*`cache` marker"):
        _train(data_dir, pp="decode|cache|keep('image', 'id')", cache_raw=True)


# ----------------------------------------------------------------------------- evaluation


def test_eval_covers_each_example_once_with_masks(data_dir):
    batches = list(
        ip.eval_batches(
            _cfg(data_dir, split="test"), batch_size=8, process_index=0, process_count=1
        )
    )
    assert len(batches) == 2 and all(b["image"].shape == (8, 16, 16, 3) for b in batches)
    masks = np.concatenate([b["_mask"] for b in batches])
    np.testing.assert_array_equal(masks, [1] * N_TEST + [0] * 3)
    ids = np.concatenate([b["id"] for b in batches])[masks == 1]
    assert sorted(ids) == list(range(100, 113))
    assert not batches[-1]["image"][5:].any()


def test_eval_hosts_disjoint_with_equal_batch_counts(data_dir):
    seen = []
    for index in range(2):
        batches = list(
            ip.eval_batches(
                _cfg(data_dir, split="test"), batch_size=8, process_index=index, process_count=2
            )
        )
        assert len(batches) == 2  # ceil(7 / 4) on both hosts, although host 1 has 6.
        ids = np.concatenate([b["id"][b["_mask"] == 1] for b in batches])
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(100, 113))


def test_eval_skips_bad_images(data_dir):
    batches = ip.eval_batches(
        _cfg(data_dir, name="cappa_test_raw", pp="decode|keep('id')"),
        batch_size=8,
        process_index=0,
        process_count=1,
    )
    masks, ids = [], []
    for batch in batches:
        masks.append(batch["_mask"])
        ids.append(batch["id"])
    masks, ids = np.concatenate(masks), np.concatenate(ids)
    assert len(masks) == 32  # ceil(28 raw / 8) batches, whatever was skipped.
    good = [i for i in range(N_RAW) if not KINDS[_kind(i)][1]]
    assert sorted(ids[masks == 1]) == good
    assert batches.stats() == {
        "input/skipped": N_RAW - len(good),
        "input/converted": sum(KINDS[_kind(i)][2] for i in good),
    }

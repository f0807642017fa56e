"""img2dataset shards (webdataset tar and TFRecord) as an input source, against written ground truth."""

import io
import itertools
import json
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from transfer import input_pipeline as ip
from transfer import shards

N, PER_SHARD = 30, 10
CORRUPT, NO_CAPTION, BLANK_CAPTION, MULTI = 11, 13, 17, 7
UNPARSABLE = 23  # TFRecord only: its caption feature is an int.
INVALID = {CORRUPT, NO_CAPTION, BLANK_CAPTION}
PP = "decode|keep('image', 'key')"
PP_CAPTIONS = "decode|flatten|choice('captions/text')|keep('image', 'captions/text', 'key')"
PP_RANDOM = "decode|random_crop(8)|flip_lr|flatten|choice('captions/text')|keep('image', 'key', 'captions/text')"


def _pixels(i):
    return np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _record(i):
    """(key, extension, image bytes, caption text or None): PNG for even i, JPEG for odd i."""
    ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
    buffer = io.BytesIO()
    Image.fromarray(_pixels(i)).save(buffer, fmt)
    image = b"not an image at all" if i == CORRUPT else buffer.getvalue()
    text = {NO_CAPTION: None, BLANK_CAPTION: "  \n", MULTI: "first 7\n second 7 \n\n"}
    return f"{i:09d}", ext, image, text.get(i, f"caption {i}")


def _expected(i):
    """The raw example the source must yield for record i."""
    key, _, image, text = _record(i)
    captions = [line.strip() for line in (text or "").split("\n") if line.strip()]
    if not captions:
        image = b""
    return key, image, captions


def _write_tar(path, ids):
    with tarfile.open(path, "w") as tar:
        for i in ids:
            key, ext, image, text = _record(i)
            members = {ext: image, "json": json.dumps({"key": key}).encode()}
            if text is not None:
                members["txt"] = text.encode()
            for member_ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member_ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_tfrecord(path, ids):
    with tf.io.TFRecordWriter(path) as writer:
        for i in ids:
            key, ext, image, text = _record(i)
            raw = {ext: image, "key": key.encode(), "url": f"http://example.com/{i}".encode()}
            if text is not None:
                raw["txt"] = text.encode()
            feature = {
                k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
                for k, v in raw.items()
            }
            for name in ("width", "height"):
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[16]))
            if i == UNPARSABLE:
                feature["txt"] = feature["width"]
            writer.write(
                tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            )


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    """{format: directory} with 3 shards of 10 records each, a stats json for shard 1 and
    img2dataset's side files (which the glob '*' must ignore)."""
    dirs = {}
    for fmt, ext, write in (
        ("webdataset", "tar", _write_tar),
        ("tfrecord", "tfrecord", _write_tfrecord),
    ):
        path = tmp_path_factory.mktemp(fmt)
        for shard in range(N // PER_SHARD):
            write(
                str(path / f"{shard:05d}.{ext}"), range(shard * PER_SHARD, (shard + 1) * PER_SHARD)
            )
        (path / "00001_stats.json").write_text(json.dumps({"count": 12, "successes": PER_SHARD}))
        (path / "00000.parquet").write_bytes(b"side file")
        dirs[fmt] = str(path)
    return dirs


def _data(directory, split="train", **kw):
    return {"name": "img2dataset", "pattern": f"{directory}/*", "split": split, **kw}


def _cfg(directory, pp=PP, batch_size=3, split="train", **kw):
    return {"data": _data(directory, split), "pp": pp, "batch_size": batch_size, **kw}


def _raw(source, index=0, count=1):
    out = []
    for ex in source.dataset(index, count).as_numpy_iterator():
        out.append((ex["key"].decode(), ex["image"], [t.decode() for t in ex["captions"]["text"]]))
    return out


def _keys(batches):
    return [k.decode() for b in batches for k in b["key"]]


def _train(directory, seed=0, start_position=0, index=0, count=1, **kw):
    return ip.TrainIterator(
        _cfg(directory, **kw),
        seed=seed,
        start_position=start_position,
        process_index=index,
        process_count=count,
    )


VALID = [f"{i:09d}" for i in range(N) if i not in INVALID]
VALID_TFRECORD = [k for k in VALID if int(k) != UNPARSABLE]


@pytest.mark.parametrize("fmt", ["webdataset", "tfrecord"])
def test_both_formats_yield_the_written_examples(shard_dirs, fmt):
    source = ip.get_builder(_data(shard_dirs[fmt]))
    assert source.format == fmt and len(source.paths) == 3 and source.num_examples() == N
    expected = [_expected(i) for i in range(N)]
    if fmt == "tfrecord":  # The unparsable record is dropped; its shard ends with padding.
        del expected[UNPARSABLE]
        expected.insert(3 * PER_SHARD - 1, ("", b"", []))
    assert _raw(source) == expected
    assert ip.num_examples(ml_collections.ConfigDict(_data(shard_dirs[fmt], format=fmt)), 0, 1) == N


def test_stats_json_is_the_count_and_short_shards_are_padded(tmp_path):
    _write_tar(str(tmp_path / "00000.tar"), range(4))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 6}))
    source = shards.ShardSource(_data(tmp_path))
    assert source.num_examples() == 6  # Stats win over the 4 records really there.
    assert _raw(source) == [_expected(i) for i in range(4)] + [("", b"", [])] * 2


def test_captions_work_with_the_scenes_pp(shard_dirs):
    """One caption per example, drawn from the record's lines; both lines of MULTI get drawn."""
    batches = list(itertools.islice(_train(shard_dirs["tfrecord"], pp=PP_CAPTIONS), 18))
    assert len({int(k) for b in batches for k in b["key"]}) == len(VALID_TFRECORD)  # 2 epochs.
    for batch in batches:
        for key, text, image in zip(
            batch["key"], batch["captions/text"], batch["image"], strict=True
        ):
            assert text.decode() in _expected(int(key))[2]
            if int(key) % 2 == 0:  # PNG: lossless.
                np.testing.assert_array_equal(image, _pixels(int(key)))
    source = shards.ShardSource(_data(shard_dirs["webdataset"]))
    multi = next(ex for ex in source.dataset().skip(MULTI).take(1))
    pp = ip.pp_lib.parse(PP_CAPTIONS)
    seeds = tf.data.Dataset.range(16).map(lambda s: tf.stack([tf.constant(1, tf.int64), s]))
    drawn = {
        ex["captions/text"]
        for ex in seeds.map(lambda s: pp({**multi, "_seed": s})).as_numpy_iterator()
    }
    assert drawn == {b"first 7", b"second 7"}


@pytest.mark.parametrize("fmt", ["webdataset", "tfrecord"])
def test_truncated_shard_ends_early_and_is_padded(tmp_path, fmt):
    """Counted by a pass (no stats) or by stats, a damaged tail never shifts later records."""
    ext, write = ("tar", _write_tar) if fmt == "webdataset" else ("tfrecord", _write_tfrecord)
    sources = []
    for name, stats in (("counted", None), ("stated", {"successes": 4})):
        directory = tmp_path / name
        directory.mkdir()
        for shard in range(2):
            write(str(directory / f"{shard:05d}.{ext}"), range(shard * 4, shard * 4 + 4))
        damaged = directory / f"00000.{ext}"
        damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])
        if stats:
            (directory / "00000_stats.json").write_text(json.dumps(stats))
        sources.append(shards.ShardSource(_data(directory)))
    counted, stated = sources
    readable = counted.counts[0]
    assert 1 <= readable < 4 and stated.counts[0] == 4
    records = _raw(stated)
    assert records[:readable] == _raw(counted)[:readable] == [_expected(i) for i in range(readable)]
    assert records[readable:4] == [("", b"", [])] * (4 - readable)
    assert records[4:] == _raw(counted)[readable:] == [_expected(i) for i in range(4, 8)]


@pytest.mark.parametrize("fmt", ["webdataset", "tfrecord"])
def test_bad_records_skipped_and_counted(shard_dirs, fmt):
    iterator = _train(shard_dirs[fmt], shuffle_buffer_size=0, batch_size=2)
    valid = VALID if fmt == "webdataset" else VALID_TFRECORD
    batches = list(itertools.islice(iterator, len(valid)))  # Two epochs.
    assert _keys(batches) == valid * 2
    consumed = 2 * N - (fmt == "tfrecord")  # The padding ending shard 2 is not reached yet.
    assert iterator.position == consumed
    assert iterator.stats()["input/skipped"] == consumed - 2 * len(valid)


@pytest.mark.parametrize(
    "fmt, done", [("webdataset", 4), ("tfrecord", 13)]
)  # 13 batches: in epoch 2.
def test_resume_is_bit_exact(shard_dirs, fmt, done):
    kw = dict(seed=3, pp=PP_RANDOM, shuffle_buffer_size=16)
    original = _train(shard_dirs[fmt], **kw)
    list(itertools.islice(original, done))
    position, skipped = original.position, original.stats()["input/skipped"]
    expected = list(itertools.islice(original, 3))
    resumed = ip.TrainIterator(
        _cfg(shard_dirs[fmt], pp=kw["pp"], shuffle_buffer_size=16),
        seed=3,
        start_position=position,
        process_index=0,
        process_count=1,
        start_skipped=skipped,
    )
    for a, b in zip(list(itertools.islice(resumed, 3)), expected, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert resumed.position == original.position
    assert resumed.stats()["input/skipped"] == original.stats()["input/skipped"]


@pytest.mark.parametrize("count", [2, 3, 4])
def test_hosts_get_disjoint_slices_that_cover_everything(shard_dirs, count):
    source = shards.ShardSource(_data(shard_dirs["webdataset"]))
    parts = [[key for key, _, _ in _raw(source, i, count)] for i in range(count)]
    sizes = [source.num_examples(i, count) for i in range(count)]
    assert [len(p) for p in parts] == sizes and max(sizes) - min(sizes) <= 1
    assert list(itertools.chain(*parts)) == [f"{i:09d}" for i in range(N)]
    if count == 3:  # Shards divide evenly: each host opens only its own shard.
        assert [source.pieces(i, 3) for i in range(3)] == [[(p, 0, 10)] for p in source.paths]


def test_train_hosts_are_disjoint(shard_dirs):
    seen = []
    for index in range(2):
        iterator = _train(shard_dirs["tfrecord"], batch_size=2, index=index, count=2)
        seen.append(set(_keys(itertools.islice(iterator, 13))))  # One epoch: 13 valid of 15.
        assert iterator.epoch_size == 15
    assert seen[0] == set(VALID[:13]) and seen[1] == set(VALID_TFRECORD[13:])


def test_split_slices(shard_dirs):
    data = _data(shard_dirs["webdataset"])
    head = shards.ShardSource({**data, "split": "train[:50%]"})
    tail = shards.ShardSource({**data, "split": "train[-15:]"})
    assert _raw(head) + _raw(tail) == [_expected(i) for i in range(N)]
    assert shards.ShardSource({**data, "split": "train[3:5]"}).pieces() == [(head.paths[0], 3, 2)]
    assert shards.split_range("train[:95%]", 100) == range(95)
    with pytest.raises(ValueError, match=r"single split 'train'.*train\[95%:\]"):
        shards.ShardSource({**data, "split": "validation"})


def test_bad_config_errors(shard_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'/no/such/dir/\*\.tar' matches no shard"):
        ip.get_builder({"name": "img2dataset", "pattern": ["/no/such/dir/*.tar"], "split": "train"})
    with pytest.raises(ValueError, match="Did you mean 'pattern'"):
        ip.get_builder({"name": "img2dataset", "patern": "x/*.tar", "split": "train"})
    _write_tar(str(tmp_path / "00000.tar"), range(2))
    (tmp_path / "00000_stats.json").write_text("{not json")
    with pytest.raises(ValueError, match="00000_stats.json.*Fix or delete"):
        shards.ShardSource(_data(tmp_path))
    (tmp_path / "a.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="set input.data.format"):
        shards.ShardSource(_data(tmp_path))
    with pytest.raises(ValueError, match="input.data.format must be"):
        shards.ShardSource(_data(shard_dirs["tfrecord"], format="parquet"))


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_example_once(shard_dirs, count):
    keys, batches = [], []
    for index in range(count):
        host = list(
            ip.eval_batches(
                _cfg(shard_dirs["webdataset"]),
                batch_size=8,
                process_index=index,
                process_count=count,
            )
        )
        batches.append(len(host))
        keys += [k.decode() for b in host for k, m in zip(b["key"], b["_mask"], strict=True) if m]
    assert keys == VALID and len(set(batches)) == 1

"""Image-caption shards written by img2dataset, as an input source next to TFDS.

Usage (any config; the pp strings of `scenes` / `coco_captions` work unchanged):

    config.input.data = dict(
        name="img2dataset",
        pattern="gs://bucket/shards/*.tar",  # a glob or a list of globs; local paths work too
        format="auto",                       # "auto" (by file extension), "webdataset" or "tfrecord"
        image_ext=("jpg", "jpeg", "png", "webp"),  # first one present in a record wins
        caption_key="txt",
        split="train[:95%]",                 # "train" or "train[a:b]" (ints or percents, like TFDS)
    )
    config.input.pp = "decode|resize(224)|flatten|choice('captions/text')|keep('image', 'captions/text')"

Raw examples look like the embedded `scenes` dataset read with encoded images:
`{"image": encoded bytes, "captions": {"text": [str, ...]}, "key": str}`. A caption holding several
lines gives several captions (one per non-empty line), so `choice` samples one per step.

The example index space is every record of every shard, shards in glob order (the matches of
each glob sorted, globs in the order given, duplicates dropped). `split` slices that space like a
TFDS slice of the single split "train" (percent bounds round to the nearest example); the slice is
then cut into `process_count` contiguous, near-equal host slices (the first hosts get one more,
like TFDS), and each host opens only the shards its slice overlaps.

Counts come from img2dataset's `{shard}_stats.json` ("successes") when it sits next to a shard,
otherwise from one pass over the shard (tar: member headers only); counts are kept in memory only.
The count is a contract: a shard with fewer records than counted is padded with invalid records,
extra records are ignored, so stream positions (and exact resume) never shift.

A record without an image or without a caption becomes an invalid example (empty image bytes, no
captions): the pp's `decode` (or `choice` of a caption) fails on it and the pipeline drops and
counts it in `input/skipped`, exactly like a corrupt image. A damaged shard ends at the
damage and the rest of its count is padded; an unparsable TFRecord (wrong feature types) is
dropped and its shard padded at the end.

Throughput: TFRecord shards are read by native tf.data ops; tar shards by one Python generator
per host (tarfile over tf.io.gfile, so gs:// works), which holds the GIL - prefer TFRecord for
large runs.
"""

from __future__ import annotations

import difflib
import json
import math
import posixpath
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from transfer.config import MissingFileError

NAME = "img2dataset"
KEYS = ("name", "pattern", "format", "image_ext", "caption_key", "split", "data_dir")
_TAR_EXT = (".tar",)
_TFRECORD_EXT = (".tfrecord", ".tfrecords", ".tfrec")
_SIDE_FILES = (".json", ".parquet")  # img2dataset writes these next to shards.
_SPLIT = re.compile(r"^train(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")
# A damaged tar: tarfile's own errors, or GFile's when a seek passes the end of the file.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, tf.errors.OpError)
_counts: dict[tuple[str, str], int] = {}  # (path, format) -> records (stats or counting pass).


def is_shards(data_cfg: Mapping[str, Any]) -> bool:
    """True when `data_cfg` asks for img2dataset shards instead of a TFDS dataset."""
    return data_cfg.get("name") == NAME


# ----------------------------------------------------------------------------- config


def _check_keys(data_cfg: Mapping[str, Any]) -> None:
    """input.data is an open config sub-tree: catch typos here, they would be ignored otherwise."""
    for key in data_cfg:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown input.data key {key!r} for {NAME} shards.{hint} Valid: {KEYS}"
            )


def _patterns(data_cfg: Mapping[str, Any]) -> list[str]:
    pattern = data_cfg.get("pattern")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"input.data.pattern must be a glob or a list of globs of {NAME} shards "
            f"(e.g. 'shards/*.tar'), got {pattern!r}."
        )
    return patterns


def resolve(patterns: Sequence[str]) -> list[str]:
    """Shard paths: each glob's matches sorted, globs in order, duplicates and side files dropped."""
    paths: list[str] = []
    for pattern in patterns:
        matches = [p for p in sorted(tf.io.gfile.glob(pattern)) if not p.endswith(_SIDE_FILES)]
        if not matches:
            raise MissingFileError(
                f"input.data.pattern {pattern!r} matches no shard files; check the path (local or "
                "gs://) and the glob, e.g. 'dir/*.tar' or 'dir/*.tfrecord'."
            )
        paths += [p for p in matches if p not in paths]
    return paths


def _format(paths: Sequence[str], fmt: str) -> str:
    if fmt in ("webdataset", "tfrecord"):
        return fmt
    if fmt != "auto":
        raise ValueError(
            f"input.data.format must be 'auto', 'webdataset' or 'tfrecord', got {fmt!r}."
        )
    found = {"webdataset" if p.endswith(_TAR_EXT) else "tfrecord" for p in paths}
    unknown = [p for p in paths if not p.endswith(_TAR_EXT + _TFRECORD_EXT)]
    if unknown or len(found) != 1:
        raise ValueError(
            f"Cannot tell the shard format from the file names (need all {_TAR_EXT} or all "
            f"{_TFRECORD_EXT}; odd ones: {unknown[:3] or paths[:3]}): set input.data.format to "
            "'webdataset' or 'tfrecord', or narrow input.data.pattern."
        )
    return found.pop()


def _bound(text: str | None, n: int) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):
        percent = int(text[:-1])
        return int(math.copysign(math.floor(abs(percent) * n / 100 + 0.5), percent))
    return int(text)


def split_range(split: str, n: int) -> range:
    """Example indices of `split` ("train" or a TFDS-like slice "train[a:b]") among `n` examples."""
    match = _SPLIT.match(split.replace(" ", ""))
    if not match:
        raise ValueError(
            f"{NAME} shards have a single split 'train'; got split {split!r}. Hold examples out "
            "with a slice such as 'train[:95%]' / 'train[95%:]' or 'train[:-1000]', or point "
            "input.data.pattern at other shards."
        )
    return range(n)[_bound(match.group(1), n) : _bound(match.group(2), n)]


def host_range(indices: range, index: int, count: int) -> range:
    """Contiguous near-equal part `index` of `count` (the first `len % count` parts get one more)."""
    size, extra = divmod(len(indices), count)
    lo = index * size + min(index, extra)
    return indices[lo : lo + size + (index < extra)]


# ----------------------------------------------------------------------------- reading records


def _member_key(name: str) -> tuple[str, str] | None:
    """webdataset convention: 'dir/000012.jpg' -> ('dir/000012', 'jpg'); no extension -> None."""
    directory, base = posixpath.split(name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem), ext.lower()


def _tar_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) for runs of consecutive members sharing a key; headers only."""
    key, group = None, {}
    for member in tar:
        parsed = _member_key(member.name) if member.isfile() else None
        if parsed is None:
            continue
        if parsed[0] != key and group:
            yield key, group
            group = {}
        key = parsed[0]
        group[parsed[1]] = member
    if group:
        yield key, group


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> bytes:
    return tar.extractfile(member).read() if member is not None else b""


def _tar_records(
    paths: np.ndarray, starts: np.ndarray, counts: np.ndarray, image_ext: np.ndarray, caption: bytes
) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(key, image bytes, caption bytes) of records [start, start + count) of each tar, padded
    with empty records when a tar is short; skipped records cost a header read, no data."""
    exts, caption_ext = [e.decode().lower() for e in image_ext], caption.decode().lower()
    for path, start, count in zip(paths, starts, counts, strict=True):
        done = 0
        try:
            with (
                tf.io.gfile.GFile(path.decode(), "rb") as f,
                tarfile.open(fileobj=f, mode="r:") as tar,
            ):
                for i, (key, group) in enumerate(_tar_groups(tar)):
                    if done == count:
                        break
                    if i < start:
                        continue
                    image = next((group[e] for e in exts if e in group), None)
                    text = group.get(caption_ext)
                    yield key.encode(), _read(tar, image), _read(tar, text)
                    done += 1
        except _READ_ERRORS as e:
            print(
                f"WARNING: {NAME} shard {path.decode()} is unreadable after {done} records ({e})."
            )
        for _ in range(count - done):
            yield b"", b"", b""


def _columns(pieces: list[tuple[str, int, int]]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(paths, starts, counts) as tensors; typed explicitly so that no pieces still works."""
    paths = tf.constant([p for p, _, _ in pieces], tf.string)
    starts = tf.constant([s for _, s, _ in pieces], tf.int64)
    return paths, starts, tf.constant([c for _, _, c in pieces], tf.int64)


def _tar_dataset(pieces: list[tuple[str, int, int]], image_ext: Sequence[str], caption: str) -> Any:
    spec = tf.TensorSpec([], tf.string)
    return tf.data.Dataset.from_generator(
        _tar_records,
        output_signature=(spec, spec, spec),
        args=(
            *_columns(pieces),
            tf.constant(list(image_ext), tf.string),
            caption.encode(),
        ),
    )


def _tfrecord_dataset(
    pieces: list[tuple[str, int, int]], image_ext: Sequence[str], caption: str
) -> Any:
    """Unreadable records (a corrupt tail ends the shard) and unparsable ones (wrong feature
    types) are dropped inside their shard and made up for by padding at the shard's end, so a
    shard always yields its count and the index -> record map is the same on every read."""
    features = {k: tf.io.FixedLenFeature([], tf.string, "") for k in {*image_ext, caption, "key"}}
    empty = tf.constant(b"")

    def piece(path: tf.Tensor, start: tf.Tensor, count: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(path).ignore_errors().map(parse).ignore_errors()
        padding = tf.data.Dataset.from_tensors((empty, empty, empty)).repeat()
        return records.concatenate(padding).skip(start).take(count)

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, features)
        image = tf.constant(b"")
        for ext in reversed(list(image_ext)):  # The first extension present wins.
            image = tf.where(tf.strings.length(example[ext]) > 0, example[ext], image)
        return example["key"], image, example[caption]

    return tf.data.Dataset.from_tensor_slices(_columns(pieces)).flat_map(piece)


def to_example(key: tf.Tensor, image: tf.Tensor, text: tf.Tensor) -> dict[str, Any]:
    """The raw example; records lacking an image or a caption get empty image bytes (skipped)."""
    lines = tf.strings.strip(tf.strings.split(text, "\n"))
    captions = tf.boolean_mask(lines, tf.strings.length(lines) > 0)
    valid = tf.logical_and(tf.strings.length(image) > 0, tf.size(captions) > 0)
    return {
        "image": tf.where(valid, image, tf.constant(b"")),
        "captions": {"text": tf.boolean_mask(captions, tf.fill(tf.shape(captions), valid))},
        "key": key,
    }


# ----------------------------------------------------------------------------- counting


def _stats_count(path: str) -> int | None:
    stats = posixpath.splitext(path)[0] + "_stats.json"
    if not tf.io.gfile.exists(stats):
        return None
    try:
        with tf.io.gfile.GFile(stats) as f:
            successes = json.load(f).get("successes")
        return None if successes is None else int(successes)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(
            f"Cannot read the record count ('successes') of {stats}: {e}. Fix or delete that "
            "file (the shard is then counted by reading it)."
        ) from None


def _pass_count(path: str, fmt: str) -> int:
    """Records readable before the end or the first damage (the reader stops there too)."""
    if fmt == "tfrecord":
        records = tf.data.TFRecordDataset(path).ignore_errors()
        return int(records.reduce(np.int64(0), lambda n, _: n + 1))
    n = 0
    try:
        with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for _ in _tar_groups(tar):
                n += 1
    except _READ_ERRORS as e:
        print(f"WARNING: {NAME} shard {path} is unreadable after {n} records ({e}).")
    return n


def shard_count(path: str, fmt: str) -> int:
    """Records in one shard: the stats file's "successes" if present, else a counting pass.
    Remembered per process (evaluations re-open the source), never written to disk."""
    if (path, fmt) not in _counts:
        n = _stats_count(path)
        _counts[(path, fmt)] = _pass_count(path, fmt) if n is None else n
    return _counts[(path, fmt)]


# ----------------------------------------------------------------------------- the source


class ShardSource:
    """Resolved shards of one `input.data` config: the globs, format and counts are checked at
    construction (start-up), so a bad path fails before any training."""

    def __init__(self, data_cfg: Mapping[str, Any]):
        _check_keys(data_cfg)
        self.paths = resolve(_patterns(data_cfg))
        self.format = _format(self.paths, data_cfg.get("format", "auto"))
        image_ext = data_cfg.get("image_ext", ("jpg", "jpeg", "png", "webp"))
        self.image_ext = (image_ext,) if isinstance(image_ext, str) else tuple(image_ext)
        self.caption_key = str(data_cfg.get("caption_key", "txt"))
        self.counts = [shard_count(p, self.format) for p in self.paths]
        self.split = split_range(str(data_cfg.get("split", "train")), sum(self.counts))

    def _host(self, index: int, count: int) -> range:
        if not 0 <= index < count:
            raise ValueError(f"process_index {index} not in [0, {count})")
        return host_range(self.split, index, count)

    def num_examples(self, index: int = 0, count: int = 1) -> int:
        """Raw records in host `index`'s slice (invalid ones included)."""
        return len(self._host(index, count))

    def pieces(self, index: int = 0, count: int = 1) -> list[tuple[str, int, int]]:
        """(shard path, first record, number of records) covering the host slice, in order."""
        wanted = self._host(index, count)
        out, first = [], 0
        for path, n in zip(self.paths, self.counts, strict=True):
            lo, hi = max(wanted.start, first), min(wanted.stop, first + n)
            if lo < hi:
                out.append((path, lo - first, hi - lo))
            first += n
        return out

    def dataset(self, index: int = 0, count: int = 1) -> tf.data.Dataset:
        """The host slice's raw examples in index order (see `to_example`), deterministic."""
        make = _tfrecord_dataset if self.format == "tfrecord" else _tar_dataset
        records = make(self.pieces(index, count), self.image_ext, self.caption_key)
        return records.map(to_example)

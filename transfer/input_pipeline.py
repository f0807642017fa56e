"""TFDS input: host-sharded, deterministic, exactly resumable, robust to bad images.

The training stream of one host is a sequence of RAW (still encoded) examples:

    epoch e = this host's slice, read in file order, shuffled with a seed from (run seed, e)
    stream  = epoch 0, epoch 1, ...        (stream index = position in this sequence)

Every raw example gets `_seed` = f(run seed, stream index) before the pp runs, so random
crops/flips depend only on where the example sits in the stream. Resuming at `position`
rebuilds the stream from epoch `position // n` and skips `position % n` raw records: skipping
happens before decoding, and never more than one epoch is skipped.

Examples whose pp fails (corrupt or truncated image bytes, crops larger than the image) are
dropped by `ignore_errors`; each kept example carries its stream index, so the number dropped
is exact: raw records consumed minus examples returned.

A `cache` marker in the pp (`decode|flatten|tokenize(...)|cache|choice(...)|...`) runs the ops
before it once per example at start-up and keeps their outputs in memory (the whole host slice:
for datasets that fit, e.g. the embedded ones); the stream then shuffles those outputs instead of
raw records, and the rest of the pp draws the same seeds as without the marker. An epoch is then
the examples the prefix kept; the ones it failed on are dropped and counted once.

`input.data.name="img2dataset"` reads image-caption shards instead of TFDS (transfer/shards.py),
with the same stream, seeds, resume and skipping. Any other source plugs in by import string,
`input.data.source="package.module:Class"`: `Class(data_cfg)` with `num_examples(index, count)`
and `dataset(index, count)` (this host's raw examples in a fixed order, a tf.data.Dataset of
dicts); e.g. cached tower features (pretrain/features.py). A source may also define
`fetch(example) -> example`, run inside the pp map (after shuffling and skipping, before the pp):
the official COCO / VQAv2 / TextVQA files (`input.data.name="coco_files"`, "vqav2_files",
"textvqa_files"; transfer/file_sources.py) keep image paths in the raw stream and read them there.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from transfer import file_sources, shards
from transfer import pp as pp_lib
from transfer.config import ConfigError, UserError

# tf.data only runs on the host: keep TF off any GPU/TPU so it does not reserve accelerator memory
# that JAX needs (on CPU-only machines this is a no-op).
tf.config.set_visible_devices([], "GPU")
tf.config.set_visible_devices([], "TPU")
_MAX_EPOCHS = 2**62
_CHECK_EXAMPLES = 16  # Raw examples tried eagerly at start-up to surface pp bugs.


class DataNotPreparedError(UserError, RuntimeError):
    """The dataset is not on disk; we never download implicitly (it could take hours)."""


# ----------------------------------------------------------------------------- datasets


def _embedded_names() -> tuple[str, ...]:
    """Imports transfer.datasets (registers the embedded builders) if it exists."""
    try:
        from transfer import datasets
    except ModuleNotFoundError as e:
        if e.name != "transfer.datasets":
            raise
        return ()
    return tuple(datasets.EMBEDDED)


def _not_prepared_message(builder: tfds.core.DatasetBuilder, name: str) -> str:
    root = builder.data_dir_root
    plain = name.split(":")[0]
    msg = (
        f"TFDS dataset '{name}' is not prepared in data_dir '{root}' "
        f"(looked for {builder.data_dir}). "
    )
    manual = (getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or "").strip()
    if manual:
        msg += (
            f"It needs a manual download: {manual} Put the files in {root}/downloads/manual, "
            f"then run `tfds build {plain} --data_dir {root}`"
        )
    else:
        msg += f"Prepare it with `tfds build {plain} --data_dir {root}`"
    return msg + ", or set input.data.data_dir to a directory where it is already prepared."


def get_builder(data_cfg: Mapping[str, Any]) -> Any:
    """The TFDS builder of `data_cfg.name`; embedded datasets are prepared on first use,
    any other unprepared dataset raises DataNotPreparedError at once (no download).
    `name="img2dataset"` gives the resolved shards instead (see transfer/shards.py), the names of
    transfer/file_sources.py that source, and `source="module:Class"` an instance of that class
    (see the module docstring)."""
    if data_cfg.get("source"):
        from transfer import registry

        return registry.import_object(str(data_cfg["source"]))(data_cfg)
    if shards.is_shards(data_cfg):
        return shards.ShardSource(data_cfg)
    if file_sources.is_files(data_cfg):
        return file_sources.get_source(data_cfg)
    embedded = _embedded_names()
    name = data_cfg["name"]
    try:
        builder = tfds.builder(name, data_dir=data_cfg.get("data_dir"))
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name.split(":")[0], tfds.list_builders(), n=3)
        raise DataNotPreparedError(
            f"TFDS knows no dataset '{name}' (not registered, nor prepared in data_dir "
            f"{data_cfg.get('data_dir') or tfds.core.constants.DATA_DIR}). Close names: {close}; "
            "set input.data.name / input.data.data_dir."
        ) from None
    if builder.is_prepared():
        return builder
    if name.split(":")[0].split("/")[0] in embedded:
        print(f"Generating the embedded dataset '{name}' into {builder.data_dir} (seconds).")
        tfds.disable_progress_bar()
        builder.download_and_prepare()
        return builder
    raise DataNotPreparedError(_not_prepared_message(builder, name))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Lazy: TF-only users (tests, tools) need not pay for importing jax.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _host_split(data_cfg: Mapping[str, Any], index: int, count: int) -> Any:
    return tfds.split_for_jax_process(data_cfg["split"], process_index=index, process_count=count)


def num_examples(
    data_cfg: Mapping[str, Any], process_index: int | None = None, process_count: int | None = None
) -> int:
    """Raw examples in this host's slice of the split (bad images included)."""
    index, count = _process(process_index, process_count)
    return _host_count(get_builder(data_cfg), data_cfg, index, count)


def _host_count(builder: Any, data_cfg: Mapping[str, Any], index: int, count: int) -> int:
    if not isinstance(builder, tfds.core.DatasetBuilder):  # img2dataset shards, a plugin source.
        return builder.num_examples(index, count)
    return builder.info.splits[_host_split(data_cfg, index, count)].num_examples


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count} (each host loads an equal share)."
        )
    return global_batch_size // process_count


def encoded_images(features: tfds.features.FeaturesDict) -> dict[str, Any]:
    """Decoders that keep every Image feature encoded: skipping must not decode, and the pp's
    `decode` turns bad bytes into a dropped example instead of a crash."""
    decoders: dict[str, Any] = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            decoders[key] = tfds.decode.SkipDecoding()
        elif isinstance(feature, tfds.features.FeaturesDict):
            nested = encoded_images(feature)
            if nested:
                decoders[key] = nested
    return decoders


def _raw_dataset(builder: tfds.core.DatasetBuilder, split: Any) -> tf.data.Dataset:
    """The slice in file order; TFDS auto-caching is off so that `cache_raw` alone decides
    (a cache read partially, e.g. at shutdown, only logs a warning)."""
    read_config = tfds.ReadConfig(skip_prefetch=True, try_autocache=False)
    return builder.as_dataset(
        split=split,
        shuffle_files=False,
        read_config=read_config,
        decoders=encoded_images(builder.info.features),
    )


def _host_raw(builder: Any, data_cfg: Mapping[str, Any], index: int, count: int) -> tf.data.Dataset:
    """This host's raw examples in file order (TFDS, img2dataset shards or a plugin source)."""
    if not isinstance(builder, tfds.core.DatasetBuilder):
        return builder.dataset(index, count)
    return _raw_dataset(builder, _host_split(data_cfg, index, count))


def _fetch(builder: Any) -> Any:
    """A plugin source's `fetch(example)` (see the module docstring), else None."""
    return (
        None if isinstance(builder, tfds.core.DatasetBuilder) else getattr(builder, "fetch", None)
    )


# ----------------------------------------------------------------------------- seeds & pp


def _seed_key(seed: int, salt: int) -> int:
    """A run- and purpose-specific word below 2**61 (pp offsets stay clear of int64 overflow)."""
    return ((seed % 2**64) * 0xD1B54A32D192ED03 + salt * 0x9E3779B97F4A7C15) % 2**61


def _stream_seed(key: int, index: tf.Tensor) -> tf.Tensor:
    """int64 [2] seed [key, stream index]: unique per example; TF's stateless ops scramble
    the seed before use, so neighbouring indices give independent draws."""
    return tf.stack([tf.constant(key, tf.int64), tf.cast(index, tf.int64)])


def _prepare_fn(pp_fn: pp_lib.Op, example_key: int, fetch: Any = None) -> Any:
    """Wraps the pp op: adds `_seed` from the stream index, keeps `_index` and `_converted`; a
    source's `fetch` (reading files a raw example points to) runs first, so its errors drop and
    count the example like a corrupt image."""

    def prepare(example: dict[str, Any], index: tf.Tensor) -> dict[str, Any]:
        if fetch is not None:
            example = fetch(example)
        out = dict(pp_fn({**example, "_seed": _stream_seed(example_key, index)}))
        out.pop("_seed", None)
        out["_index"] = index
        out["_converted"] = tf.cast(out.get("_converted", 0), tf.int32)
        return out

    return prepare


def _with_indices(ds: tf.data.Dataset, start: int = 0) -> tf.data.Dataset:
    """(example, stream index). The index comes second: if reading a record fails, zip stops
    before drawing an index, so indices stay aligned with the records."""
    return tf.data.Dataset.zip(ds, tf.data.Dataset.range(start, 2**63 - 1))


def _check_pp(raw: tf.data.Dataset, prepare: Any, pp_string: str) -> None:
    """A pp that fails on EVERY example would make ignore_errors spin forever on a repeated
    stream: run it on a few raw examples first and raise its own error if none succeeds."""
    error = None
    try:
        iterator = iter(_with_indices(raw.take(_CHECK_EXAMPLES)).map(prepare))
        for _ in range(_CHECK_EXAMPLES):
            try:
                next(iterator)
                return
            except StopIteration:
                return
            except tf.errors.OpError as e:
                error = error or e
    except tf.errors.OpError as e:  # Some failures (unsupported casts) surface at creation.
        error = e
    raise ConfigError(
        f"pp {pp_string!r} fails on the first {_CHECK_EXAMPLES} examples (image "
        f"features arrive encoded: start the pp with `decode`): {error.message}"
    )


def _cache_prefix(
    raw: tf.data.Dataset, prefix: pp_lib.Op, fetch: Any
) -> tuple[tf.data.Dataset, int]:
    """(the pp's prefix, the ops before `cache`, over `raw`, kept in memory; its length). The
    prefix runs once, now: examples it fails on are dropped here, once."""

    def run(example: dict[str, Any]) -> dict[str, Any]:
        return prefix(fetch(example) if fetch is not None else example)

    try:
        ds = raw.map(run, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    except KeyError as e:
        if "_seed" not in str(e):
            raise
        raise ConfigError(  # pp._op_seed: a random op got no `_seed`.
            f"{e.args[0]} The ops before `{pp_lib.CACHE}` run once per example, without a seed: "
            f"move the random op after `{pp_lib.CACHE}`."
        ) from None
    ds = ds.ignore_errors().cache()
    kept = int(ds.reduce(np.int64(0), lambda n, _: n + 1))  # Fills the cache every epoch reads.
    return ds, kept


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return options


def _finish(
    ds: tf.data.Dataset, prepare: Any, batch_size: int, drop_remainder: bool, prefetch: int
) -> tf.data.Dataset:
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    ds = ds.batch(
        batch_size,
        drop_remainder=drop_remainder,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.prefetch(prefetch or tf.data.AUTOTUNE).with_options(_options())


# ----------------------------------------------------------------------------- training


def _train_stream(
    raw: tf.data.Dataset, n: int, shuffle_buffer: int, shuffle_key: int, start_position: int
) -> tf.data.Dataset:
    """(raw example, stream index) from `start_position` on; epochs are shuffled independently
    so a resume only rebuilds the current epoch instead of replaying the whole run."""

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        if not shuffle_buffer:
            return raw
        # tf.data mixes the global TF seed into shuffle seeds; pin it in this function's graph
        # so that a tf.random.set_seed() elsewhere cannot change the order (and break resume).
        tf.compat.v1.get_default_graph().seed = 0x2545F491
        seed = tf.random.stateless_uniform(
            [], _stream_seed(shuffle_key, e), minval=None, maxval=None, dtype=tf.int64, alg="philox"
        )
        return raw.shuffle(min(shuffle_buffer, n), seed=seed, reshuffle_each_iteration=False)

    first_epoch, offset = divmod(start_position, n)
    stream = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch).skip(offset)
    return _with_indices(stream, start_position)


class TrainIterator:
    """Infinite, deterministic batches for one host; exact resume.

    `position` is the host-local stream index right after the last returned batch:
    `TrainIterator(cfg, seed=s, start_position=it.position)` yields bit-identical batches to
    the ones `it` would yield next. `start_skipped` seeds the cumulative skipped count
    (pass the saved `stats()["input/skipped"]`; it cannot be recovered from `position` alone).
    """

    def __init__(
        self,
        input_cfg: Mapping[str, Any],
        *,
        seed: int,
        start_position: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        start_skipped: int = 0,
        pp_modules: Sequence[str] = (),
    ):
        index, count = _process(process_index, process_count)
        self.batch_size = _local_batch_size(int(input_cfg["batch_size"]), count)
        data_cfg = input_cfg["data"]
        builder = get_builder(data_cfg)
        self.epoch_size = _host_count(builder, data_cfg, index, count)
        if self.epoch_size == 0:
            raise ConfigError(
                f"Split {data_cfg['split']!r} of {data_cfg['name']!r} has no "
                f"examples for process {index}/{count}."
            )
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        raw = _host_raw(builder, data_cfg, index, count)
        pp_string, key, fetch = input_cfg["pp"], _seed_key(seed, 1), _fetch(builder)
        full = pp_lib.parse(pp_string, pp_modules)
        _check_pp(raw, _prepare_fn(full, key, fetch), pp_string)
        prefix, rest = pp_lib.parse_cached(pp_string, pp_modules)
        self.cache_dropped = 0
        if prefix is not None and input_cfg.get("cache_raw", False):
            raise ConfigError(
                "input.cache_raw and a `cache` marker in input.pp both cache the data: keep one "
                "(the marker also keeps the work of the ops before it)."
            )
        if prefix is not None:
            raw, kept = _cache_prefix(raw, prefix, fetch)
            self.cache_dropped, self.epoch_size, fetch = self.epoch_size - kept, kept, None
        elif input_cfg.get("cache_raw", False):
            raw = raw.cache()
        prepare = _prepare_fn(rest, key, fetch)
        shuffle = input_cfg.get("shuffle_buffer_size", 10_000) or 0
        stream = _train_stream(
            raw, self.epoch_size, int(shuffle), _seed_key(seed, 2), start_position
        )
        ds = _finish(stream, prepare, self.batch_size, True, input_cfg.get("prefetch", 2))
        self._iterator = ds.as_numpy_iterator()
        self.position = self._start_position = start_position
        self._start_skipped = start_skipped
        self._returned = 0
        self._converted = 0

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        indices = batch.pop("_index")
        self.position = int(indices[-1]) + 1
        self._returned += len(indices)
        self._converted += int(batch.pop("_converted").sum())
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def stats(self) -> dict[str, int]:
        """Bad examples dropped (cumulative) and images converted to RGB (this iterator)."""
        consumed = self.position - self._start_position
        # Examples the cached pp prefix failed on drop once per run (a resume starts from the
        # saved count, which has them).
        cached = self.cache_dropped if self._start_position == 0 else 0
        return {
            "input/skipped": self._start_skipped + cached + consumed - self._returned,
            "input/converted": self._converted,
        }


# ----------------------------------------------------------------------------- evaluation


def _padding(template: Mapping[str, Any], size: int) -> dict[str, np.ndarray]:
    """`size` zero examples shaped like `template` (numpy arrays or TensorSpecs)."""
    out = {}
    for key, value in template.items():
        shape = tuple(value.shape[1:])
        if any(d is None for d in shape):
            raise ValueError(
                f"Cannot pad eval feature {key!r} of unknown shape {shape}: "
                "make the pp produce fixed shapes (e.g. resize)."
            )
        dtype = value.dtype if isinstance(value, np.ndarray) else value.dtype.as_numpy_dtype
        fill = b"" if dtype == np.object_ else 0
        out[key] = np.full((size, *shape), fill, dtype=dtype)
    return out


class EvalBatches:
    """One pass over this host's slice in file order, fixed-size batches with `_mask`.

    Every host yields the same number of batches (collectives would hang otherwise): enough
    for the largest host slice, padded with fully masked batches.
    """

    def __init__(
        self,
        eval_input_cfg: Mapping[str, Any],
        *,
        batch_size: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        index, count = _process(process_index, process_count)
        self.batch_size = _local_batch_size(int(batch_size), count)
        data_cfg = eval_input_cfg["data"]
        builder = get_builder(data_cfg)
        self.num_raw = _host_count(builder, data_cfg, index, count)
        largest = max(_host_count(builder, data_cfg, i, count) for i in range(count))
        self.num_batches = math.ceil(largest / self.batch_size)
        raw = _host_raw(builder, data_cfg, index, count)
        prepare = _prepare_fn(pp_lib.parse(eval_input_cfg["pp"]), _seed_key(0, 3), _fetch(builder))
        ds = _finish(
            _with_indices(raw), prepare, self.batch_size, False, eval_input_cfg.get("prefetch", 2)
        )
        self._spec = {k: v for k, v in ds.element_spec.items() if not k.startswith("_")}
        self._batches = self._generate(ds)
        self._seen = self._returned = self._converted = 0

    def _generate(self, ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
        template: Mapping[str, Any] = self._spec
        produced = 0
        for batch in ds.as_numpy_iterator():
            indices = batch.pop("_index")
            self._seen = int(indices[-1]) + 1
            self._returned += len(indices)
            self._converted += int(batch.pop("_converted").sum())
            template = batch = {k: v for k, v in batch.items() if not k.startswith("_")}
            yield self._pad(batch, len(indices))
            produced += 1
        self._seen = self.num_raw
        for _ in range(produced, self.num_batches):
            yield self._pad(_padding(template, 0), 0)

    def _pad(self, batch: dict[str, np.ndarray], real: int) -> dict[str, np.ndarray]:
        missing = self.batch_size - real
        if missing:
            pad = _padding(batch, missing)
            batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
        mask = np.zeros(self.batch_size, np.float32)
        mask[:real] = 1.0
        return {**batch, "_mask": mask}

    def __iter__(self) -> EvalBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._batches)

    def stats(self) -> dict[str, int]:
        """Bad examples dropped and images converted so far in this pass."""
        return {"input/skipped": self._seen - self._returned, "input/converted": self._converted}


def eval_batches(
    eval_input_cfg: Mapping[str, Any],
    *,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    """One finite pass over this host's slice; `batch_size` is GLOBAL (split across hosts)."""
    return EvalBatches(
        eval_input_cfg,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
    )

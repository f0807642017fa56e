"""Real TFDS builders without their data: `tfds.testing.mock_data(USE_CODE)` made strict enough for our engine.

`mock_data(policy=USE_CODE)` builds every dataset from its real builder class (real feature spec) but knows no
split names and reports nothing as prepared. `real_builders()` adds what the input pipeline needs and what a
test of a config must check:

- `is_prepared()` is true (transfer/input_pipeline.get_builder refuses unprepared datasets; the engine stays as
  it is, the test fakes the preparation);
- `info.splits` holds the builder's REAL split names, each `SPLIT_SIZE` examples long, so a wrong split name
  raises as it would on the prepared dataset. The names come from the `SPLITS` of the builder's own test in the
  installed TFDS (the only offline record of them: split names are known only once a dataset is generated);
- a split (or slice) yields as many random examples as it holds, from the real features, serialized, parsed
  and decoded by the real feature code (as if read from prepared files). Unknown dimensions are 10 (images
  10x10, sequences of 10): TFDS's default generator draws each sub-feature of a `Sequence({...})` its own
  length, which fails to encode (coco_captions' captions), and boxes with ymin > ymax, which fail too.
  Integers are drawn below 2**31 (TFDS's default, 255, repeats ids such as `image/id` within 8 examples).

`shrink(split, k)` turns a config's split expression into k examples per part, from the part's own start, with
the split names kept (so they are still checked): `train[1000:]` -> `train[1000:1008]`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import pathlib
import re
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import dataset_builder, dataset_info, naming
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.testing import mocking

SPLIT_SIZE = 1_000_000  # examples per real split: larger than any absolute index in our configs


def builder_exists(name: str) -> bool:
    """Whether the installed TFDS registers a builder for `name` (`name/config:version` allowed)."""
    try:
        tfds.builder_cls(name.split(":")[0].split("/")[0])
    except tfds.core.registered.DatasetNotFoundError:
        return False
    return True


@functools.cache
def real_split_names(name: str) -> tuple[str, ...]:
    """The split names the builder's own TFDS test expects (the `SPLITS` of its DatasetBuilderTestCase)."""
    cls = tfds.builder_cls(name)
    spec = importlib.util.find_spec(cls.__module__ + "_test")
    if spec is None or spec.origin is None:
        raise LookupError(
            f"TFDS ships no test of {cls.__module__}: no record of {name}'s split names."
        )
    tree = ast.parse(pathlib.Path(spec.origin).read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        attrs = {
            target.id: stmt.value
            for stmt in node.body
            if isinstance(stmt, ast.Assign)
            for target in stmt.targets
            if isinstance(target, ast.Name)
        }
        dataset_class = attrs.get("DATASET_CLASS")
        if dataset_class is not None and "SPLITS" in attrs:
            if ast.unparse(dataset_class).split(".")[-1] == cls.__name__:
                return tuple(ast.literal_eval(attrs["SPLITS"]))
    raise LookupError(f"{spec.origin} has no test of {cls.__name__} with SPLITS.")


def _splits(info: dataset_info.DatasetInfo) -> splits_lib.SplitDict:
    def one(split: str) -> splits_lib.SplitInfo:
        template = naming.ShardedFileTemplate(
            data_dir=info.data_dir, dataset_name=info.name, split=split, filetype_suffix="tfrecord"
        )
        return splits_lib.SplitInfo(
            name=split, shard_lengths=[SPLIT_SIZE], num_bytes=0, filename_template=template
        )

    return splits_lib.SplitDict([one(s) for s in real_split_names(info.name)])


class _Examples(mocking.SerializedRandomFakeGenerator):
    """TFDS's random examples as tf.Example bytes, with valid boxes (min <= max)."""

    def _generate_random_obj(self, feature: Any, tensor_info: Any, rng: np.random.Generator) -> Any:
        value = super()._generate_random_obj(feature, tensor_info, rng)
        if isinstance(feature, tfds.features.BBoxFeature):
            low, high = (
                np.minimum(value[..., :2], value[..., 2:]),
                np.maximum(value[..., :2], value[..., 2:]),
            )
            value = np.concatenate([low, high], axis=-1)
        return value


def _as_dataset(self: Any, split: Any, decoders: Any = None, **kwargs: Any) -> tf.data.Dataset:
    """Replaces FileReaderBuilder._as_dataset: `num_examples(split)` random examples of the real features."""
    del kwargs
    num = self.info.splits[split].num_examples  # raises for a split name the dataset does not have
    features = self.info.features
    generator = functools.partial(
        _Examples, features, num, max_value=2**31 - 1, constant_dynamic_shape=True
    )
    ds = tf.data.Dataset.from_generator(generator, output_signature=tf.TensorSpec((), tf.string))
    ds = ds.apply(tf.data.experimental.assert_cardinality(num))
    return ds.map(functools.partial(features.deserialize_example, decoders=decoders))


@contextlib.contextmanager
def real_builders() -> Iterator[None]:
    """Every TFDS builder prepared, with its real split names and features, random examples (module docstring)."""
    real_as_dataset = dataset_builder.DatasetBuilder.as_dataset
    with contextlib.ExitStack() as stack:
        root = epath.Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(
            tfds.testing.mock_data(
                policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_as_dataset
            )
        )
        for name, new in [
            ("is_prepared", lambda self: True),
            ("splits", property(_splits)),
            # mock_data builds datasets inside a fake file system (test_utils.MockFs) that patches epath for
            # every thread, orbax's checkpoint threads included. The real as_dataset only checks that the data
            # directory exists: give it an empty one.
            ("as_dataset", real_as_dataset),
            ("data_path", property(lambda self: root)),
        ]:
            owner = dataset_info.DatasetInfo if name == "splits" else dataset_builder.DatasetBuilder
            stack.enter_context(mock.patch.object(owner, name, new))
        yield


_PART = re.compile(r"(\w[\w-]*)(?:\[(\d*)(%?):(-?\d*)%?\])?")


def shrink(split: str, k: int) -> str:
    """`k` examples of each `+`-joined part of a TFDS split expression, from the part's own start (names kept)."""
    parts = []
    for part in split.split("+"):
        match = _PART.fullmatch(part.strip())
        if not match:
            raise ValueError(f"cannot shrink split part {part!r} of {split!r}")
        name, start, percent = match.group(1), int(match.group(2) or 0), match.group(3)
        start = start * SPLIT_SIZE // 100 if percent else start
        parts.append(f"{name}[{start}:{start + k}]")
    return "+".join(parts)

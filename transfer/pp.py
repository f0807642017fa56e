"""Preprocessing ops: one example at a time, TF graph code, composed from a pp string.

A pp string such as `decode|resize(64)|value_range(-1, 1)|keep("image", "label")` is parsed
with Python's `ast` (never `eval`): the string is a chain of `|` (BitOr) whose leaves are op
names or calls with literal arguments. Each name is looked up in a registry filled by the
`@register(name)` decorator on factories `get_<name>(*args, **kwargs) -> op`. This module's ops and
`DEFAULT_MODULES` (the `tokenize` op) are always there; a config names the modules of its other ops
in `config.pp_modules` (big_vision's key, e.g. `["tasks.ocr_pp"]`), which `parse` imports first, or
writes an op's qualified name (`tasks.ocr_pp.fold(2)`).

Random ops are stateless so that a resumed run reproduces the same crops and flips: they read
`example["_seed"]` (int64 [2], put there by the input pipeline from the run seed and the
example's stream position). `parse` offsets that seed by the op's position in the pp string and
each random op adds its own name, so two random ops never share randomness.
Keys starting with "_" are pipeline-internal and survive `keep`.

A training pp may hold one `cache` marker: the deterministic ops before it run once per example
and their outputs stay in memory (small datasets: decoding and tokenizing leave each step's CPU
time); it takes no position, so seeds are the same with and without it (`parse_cached`).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from transfer.config import ConfigError

Example = dict[str, Any]
Op = Callable[[Example], Example]

_OPS: dict[str, Callable[..., Op]] = {}
# Op modules every pp string may use, imported by `parse` (they import this module, not the reverse).
DEFAULT_MODULES = ("transfer.pp_text",)


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
    """Registers an op factory under `name`; clashing names fail loudly instead of shadowing."""

    def decorator(factory: Callable[..., Op]) -> Callable[..., Op]:
        old = _OPS.get(name)
        where = lambda f: (f.__module__, f.__qualname__)
        if old is not None and where(old) != where(factory):
            raise ValueError(f"pp op {name!r} is already registered by {old.__module__}")
        _OPS[name] = factory
        return factory

    return decorator


def registered_ops() -> list[str]:
    """Names of all registered ops (sorted), e.g. for error messages and docs."""
    return sorted(_OPS)


def import_modules(modules: Sequence[str] = ()) -> None:
    """Imports `DEFAULT_MODULES` and `modules` (e.g. `config.pp_modules`) so that their ops register."""
    if isinstance(modules, str):
        modules = [modules]
    for name in (*DEFAULT_MODULES, *modules):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise
            raise ConfigError(
                f"pp module {name!r} (config.pp_modules) cannot be imported: {e}"
            ) from e


def get_op(name: str) -> Callable[..., Op]:
    """Returns the factory of op `name`; a dotted name imports its module first (plugins)."""
    if "." in name:
        module_name, _, short = name.rpartition(".")
        module = importlib.import_module(module_name)
        return _OPS.get(short) or getattr(module, short)
    if name not in _OPS:
        close = difflib.get_close_matches(name, _OPS, n=1, cutoff=0.0)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        searched = sorted({f.__module__ for f in _OPS.values()})
        raise ConfigError(
            f"Unknown pp op {name!r}.{hint} Modules searched: {searched}; an op of another module "
            "needs it in config.pp_modules (e.g. ['tasks.ocr_pp']) or a qualified name "
            f"(module.{name}). Registered ops: {registered_ops()}"
        )
    return _OPS[name]


def _dotted_name(node: ast.expr, source: str) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value, source)}.{node.attr}"
    raise ConfigError(f"Bad pp op {ast.get_source_segment(source, node)!r}: expected a name")


def _leaves(node: ast.expr) -> list[ast.expr]:
    """Flattens the left-associative `a | b | c` chain into [a, b, c]."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _leaves(node.left) + _leaves(node.right)
    return [node]


def _literal(node: ast.expr, source: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError as e:
        segment = ast.get_source_segment(source, node)
        raise ConfigError(f"pp argument {segment!r} is not a Python literal") from e


def _build(node: ast.expr, source: str) -> Op:
    if isinstance(node, ast.Call):
        args = [_literal(a, source) for a in node.args]
        kwargs = {k.arg: _literal(k.value, source) for k in node.keywords if k.arg}
        return get_op(_dotted_name(node.func, source))(*args, **kwargs)
    return get_op(_dotted_name(node, source))()


def offset_seed(seed: Any, salt: int) -> tf.Tensor:
    """A distinct seed for a purpose: `seed + [salt', 0]`. TF's stateless ops scramble the
    whole seed through Philox before use, so seeds differing by a constant give independent
    streams; this is ~10x cheaper per example than tf.random.experimental.stateless_fold_in."""
    mixed = (salt * 0x9E3779B97F4A7C15) % 2**61
    return tf.cast(seed, tf.int64) + tf.constant([mixed, 0], tf.int64)


CACHE = "cache"  # The marker that ends a train pp's cached prefix (see `parse_cached`).


def _parse_ops(pp_string: str, modules: Sequence[str]) -> list[Op | None]:
    """The ops of a pp string in order; None stands for a `cache` marker."""
    import_modules(modules)
    if not pp_string.strip():
        return []
    source = f"({pp_string.strip()})"
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"Cannot parse pp string {pp_string!r}: {e.msg}") from e
    leaves = _leaves(tree)
    return [None if _is_marker(n) else _build(n, source) for n in leaves]


def _is_marker(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == CACHE


def _compose(ops: Sequence[Op], first_position: int = 0) -> Op:
    """Runs `ops` in order; each random op sees `_seed` offset by its position in the pp string."""

    def apply(example: Mapping[str, Any]) -> Example:
        example = dict(example)
        base_seed = example.get("_seed")
        for position, op in enumerate(ops, first_position):
            if base_seed is not None:
                example["_seed"] = offset_seed(base_seed, position + 1)
            example = dict(op(example))
        if base_seed is not None:
            example["_seed"] = base_seed
        return example

    return apply


def parse(pp_string: str, modules: Sequence[str] = ()) -> Op:
    """Builds the composed op of a pp string (after importing the op `modules`); "" is the identity.
    A `cache` marker is skipped: it takes no position, so the ops after it keep their seeds."""
    return _compose([op for op in _parse_ops(pp_string, modules) if op is not None])


def parse_cached(pp_string: str, modules: Sequence[str] = ()) -> tuple[Op | None, Op]:
    """(prefix, rest) of a pp string split at its `cache` marker; prefix is None without one.

    `decode|flatten|tokenize(...)|cache|choice(...)|...`: the training input runs the prefix once
    per example and keeps its outputs in memory, so the prefix must be deterministic (it gets no
    `_seed`). The rest keeps the positions it has in the whole string, so its random ops draw
    exactly what `parse(pp_string)` draws.
    """
    ops = _parse_ops(pp_string, modules)
    if None not in ops:
        return None, _compose(ops)
    cut = ops.index(None)
    prefix, rest = ops[:cut], ops[cut + 1 :]
    if None in rest:
        raise ConfigError(f"pp string {pp_string!r} has more than one `{CACHE}` marker")
    return _compose(prefix), _compose(rest, first_position=len(prefix))


def _keys(key: str | Sequence[str]) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _op_seed(example: Example, salt: str) -> tf.Tensor:
    """Per-op seed: `_seed` offset by the op name (random ops never share draws)."""
    if "_seed" not in example:
        raise KeyError(
            f"Random pp op {salt!r} needs example['_seed'] (int64 [2]); "
            "the input pipeline adds it, tests must set it explicitly."
        )
    return offset_seed(example["_seed"], zlib.crc32(salt.encode()) << 20)


def _restore_dtype(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Rounds back to integer dtypes (tf.cast would truncate and bias images darker)."""
    return tf.saturate_cast(tf.round(image), dtype) if dtype.is_integer else tf.cast(image, dtype)


def _resize(image: tf.Tensor, size: Any, method: str, antialias: bool) -> tf.Tensor:
    """Antialiasing only matters when shrinking, and TF's antialiased kernel is ~3x slower
    than the plain one, so upsampling (most inception crops) takes the fast kernel."""
    plain = lambda: tf.image.resize(image, size, method=method)
    smooth = lambda: tf.image.resize(image, size, method=method, antialias=True)
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.convert_to_tensor(size, tf.int32))
    resized = tf.cond(shrinks, smooth, plain) if antialias else plain()
    return _restore_dtype(resized, image.dtype)


def _crop(image: tf.Tensor, offset: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """tf.slice raises on out-of-bounds crops (bad example) instead of silently clamping."""
    rank = image.shape.rank
    begin = tf.concat([tf.cast(offset, tf.int32), tf.zeros([rank - 2], tf.int32)], 0)
    return tf.slice(image, begin, list(size) + [-1] * (rank - 2))


def _map_keys(key: str | Sequence[str], fn: Callable[[tf.Tensor], tf.Tensor]) -> Op:
    def op(example: Example) -> Example:
        example = dict(example)
        for k in _keys(key):
            example[k] = fn(example[k])
        return example

    return op


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """1/2 channels (gray, gray+alpha) -> tiled gray; 4 channels (RGBA) -> alpha dropped."""
    if image.shape.rank == 2:
        image = image[:, :, None]
    channels = image.shape[-1]
    if channels is not None:
        return tf.tile(image[:, :, :1], [1, 1, 3]) if channels < 3 else image[:, :, :3]
    rgb = tf.cond(
        tf.shape(image)[-1] < 3,
        lambda: tf.tile(image[:, :, :1], [1, 1, 3]),
        lambda: image[:, :, :3],
    )
    return tf.ensure_shape(rgb, [None, None, 3])


def _decode_bytes(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (uint8 RGB image, native channel count). JPEG goes through libjpeg's own
    CMYK/gray -> RGB conversion; its channel count comes from the header, because a decoded
    CMYK JPEG already has 3 channels."""

    def jpeg() -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_jpeg(data, channels=3)
        return image, tf.image.extract_jpeg_shape(data)[2]

    def other() -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(data, channels=0, expand_animations=False)
        return _to_rgb(image), tf.shape(image)[2]

    image, channels = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    return tf.ensure_shape(image, [None, None, 3]), channels


@register("decode")
def get_decode(key: str = "image") -> Op:
    """Any encoded image (or decoded uint8 tensor) -> uint8 RGB; flags non-RGB inputs."""

    def op(example: Example) -> Example:
        value = tf.convert_to_tensor(example[key])
        if value.dtype == tf.string:
            image, channels = _decode_bytes(value)
        else:
            image = _to_rgb(value)
            channels = tf.shape(value)[-1] if value.shape.rank == 3 else tf.constant(1)
        converted = tf.cast(tf.not_equal(channels, 3), tf.int32)
        previous = tf.cast(example.get("_converted", 0), tf.int32)  # Several decoded keys.
        return {**example, key: image, "_converted": tf.maximum(converted, previous)}

    return op


@register("resize")
def get_resize(
    size: int | Sequence[int],
    key: str | Sequence[str] = "image",
    method: str = "bilinear",
    antialias: bool = True,
) -> Op:
    """Resizes to a fixed (h, w); an int means a square."""
    return _map_keys(key, lambda image: _resize(image, _hw(size), method, antialias))


@register("resize_small")
def get_resize_small(
    smaller_size: int,
    key: str | Sequence[str] = "image",
    method: str = "bilinear",
    antialias: bool = True,
) -> Op:
    """Resizes so that the smaller side is `smaller_size`, keeping the aspect ratio."""

    def fn(image: tf.Tensor) -> tf.Tensor:
        hw = tf.cast(tf.shape(image)[:2], tf.float64)
        ratio = smaller_size / tf.reduce_min(hw)
        new_hw = tf.cast(tf.round(hw * ratio), tf.int32)
        return _resize(image, tf.maximum(new_hw, 1), method, antialias)

    return _map_keys(key, fn)


@register("central_crop")
def get_central_crop(size: int | Sequence[int], key: str | Sequence[str] = "image") -> Op:
    """Crops the centre (h, w); an image smaller than the crop fails (and is skipped)."""
    hw = _hw(size)

    def fn(image: tf.Tensor) -> tf.Tensor:
        return _crop(image, (tf.shape(image)[:2] - hw) // 2, hw)

    return _map_keys(key, fn)


@register("random_crop")
def get_random_crop(size: int | Sequence[int], key: str | Sequence[str] = "image") -> Op:
    """Uniform random (h, w) crop; several keys of the same size get the same window."""
    hw = _hw(size)

    def op(example: Example) -> Example:
        seed = _op_seed(example, "random_crop")
        example = dict(example)
        for k in _keys(key):
            room = tf.shape(example[k])[:2] - hw + 1
            draw = tf.random.stateless_uniform([2], seed, alg="philox")
            offset = tf.minimum(tf.cast(draw * tf.cast(room, tf.float32), tf.int32), room - 1)
            example[k] = _crop(example[k], offset, hw)
        return example

    return op


@register("inception_crop")
def get_inception_crop(
    size: int | Sequence[int] | None = None,
    area_min: float = 5,
    area_max: float = 100,
    key: str | Sequence[str] = "image",
    method: str = "bilinear",
    antialias: bool = True,
) -> Op:
    """Random crop covering area_min..area_max percent of the image, aspect 3/4..4/3,
    then resized to `size` (kept at crop size if None)."""

    def op(example: Example) -> Example:
        seed = _op_seed(example, "inception_crop")
        example = dict(example)
        for k in _keys(key):
            begin, box, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(example[k]),
                tf.zeros([0, 0, 4], tf.float32),
                seed=seed,
                area_range=(area_min / 100, area_max / 100),
                min_object_covered=0,
                use_image_if_no_bounding_boxes=True,
            )
            crop = tf.slice(example[k], begin, box)
            example[k] = crop if size is None else _resize(crop, _hw(size), method, antialias)
        return example

    return op


@register("flip_lr")
def get_flip_lr(key: str | Sequence[str] = "image") -> Op:
    """Mirrors horizontally with probability 1/2 (the same coin for all keys)."""

    def op(example: Example) -> Example:
        flip = tf.random.stateless_uniform([], _op_seed(example, "flip_lr"), alg="philox") < 0.5
        example = dict(example)
        for k in _keys(key):
            image = example[k]
            example[k] = tf.cond(flip, lambda im=image: tf.reverse(im, [1]), lambda im=image: im)
        return example

    return op


@register("value_range")
def get_value_range(
    vmin: float = -1,
    vmax: float = 1,
    in_min: float = 0,
    in_max: float = 255,
    clip_values: bool = False,
    key: str | Sequence[str] = "image",
) -> Op:
    """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""

    def fn(image: tf.Tensor) -> tf.Tensor:
        unit = (tf.cast(image, tf.float32) - in_min) / (in_max - in_min)
        out = vmin + unit * (vmax - vmin)
        return tf.clip_by_value(out, vmin, vmax) if clip_values else out

    return _map_keys(key, fn)


@register("onehot")
def get_onehot(
    depth: int, key: str = "label", key_result: str | None = None, on: float = 1.0, off: float = 0.0
) -> Op:
    """One-hot float32 labels; a vector of labels becomes a multi-hot vector."""

    def op(example: Example) -> Example:
        example = dict(example)
        labels = tf.convert_to_tensor(example[key])
        hot = tf.one_hot(labels, depth, on_value=1.0, off_value=0.0, dtype=tf.float32)
        if labels.shape.rank:
            hot = tf.reduce_max(hot, axis=-2)
        example[key_result or key] = off + hot * (on - off)
        return example

    return op


@register("choice")
def get_choice(
    key: str | Sequence[str] = "captions/text",
    n: int = 1,
    outkey: str | Sequence[str] | None = None,
) -> Op:
    """Samples from a variable-length sequence: one element (n=1, rank drops) or n without
    replacement (repeating when shorter). Several keys share the draw (question/answer)."""
    inkeys = _keys(key)
    outkeys = inkeys if outkey is None else _keys(outkey)

    def op(example: Example) -> Example:
        seed = _op_seed(example, "choice")
        example = dict(example)
        length = tf.shape(example[inkeys[0]])[0]
        order = tf.argsort(tf.random.stateless_uniform([length], seed, alg="philox"))
        picks = tf.gather(order, tf.range(n) % length)
        for inkey, out in zip(inkeys, outkeys, strict=True):
            values = tf.gather(example[inkey], picks)
            example[out] = values[0] if n == 1 else values
        return example

    return op


@register("keep")
def get_keep(*keys: str) -> Op:
    """Keeps `keys` plus every pipeline-internal "_" key."""

    def op(example: Example) -> Example:
        missing = [k for k in keys if k not in example]
        if missing:
            raise KeyError(f"keep{keys}: missing {missing}; example has {sorted(example)}")
        return {k: v for k, v in example.items() if k in keys or k.startswith("_")}

    return op


@register("drop")
def get_drop(*keys: str) -> Op:
    """Drops `keys`; internal "_" keys cannot be dropped (the pipeline needs them)."""
    internal = [k for k in keys if k.startswith("_")]
    if internal:
        raise ValueError(f"drop: pipeline-internal keys {internal} cannot be dropped")

    def op(example: Example) -> Example:
        return {k: v for k, v in example.items() if k not in keys}

    return op


@register("copy")
def get_copy(inkey: str, outkey: str) -> Op:
    """Copies a feature, e.g. to keep the original image next to an augmented one."""

    def op(example: Example) -> Example:
        return {**example, outkey: example[inkey]}

    return op


@register("rename")
def get_rename(**outkey_inkey: str) -> Op:
    """rename(texts="captions/text"): moves each inkey to its outkey."""

    def op(example: Example) -> Example:
        example = dict(example)
        moved = {out: example.pop(inkey) for out, inkey in outkey_inkey.items()}
        return {**example, **moved}

    return op


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Example:
    flat: Example = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, Mapping) else {prefix + k: v})
    return flat


@register("flatten")
def get_flatten() -> Op:
    """TFDS nested features {"captions": {"text": t}} -> {"captions/text": t}."""
    return _flatten

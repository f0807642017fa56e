"""pp ops against numpy/PIL references, parsing, and stateless randomness."""

import functools
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from transfer import pp
from transfer.config import ConfigError

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


@functools.cache
def _graph_fn(pp_string):
    return tf.function(pp.parse(pp_string))


def _run(pp_string, example, seed=(1, 2)):
    """Runs a pp string in graph mode (like tf.data) and returns numpy values."""
    example = tf.nest.map_structure(tf.convert_to_tensor, example)
    example["_seed"] = tf.constant(seed, tf.int64)
    return {k: v.numpy() for k, v in _graph_fn(pp_string)(example).items()}


def _encode(array, fmt, mode=None, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pil_resize(array, hw):
    return np.asarray(Image.fromarray(array).resize(hw[::-1], Image.BILINEAR)).astype(int)


# ----------------------------------------------------------------------------- parsing


def test_parse_composes_ops_with_literal_args():
    out = _run(
        "decode|resize(16)|value_range(0, 1)|keep('image', 'label')",
        {"image": _encode(IMAGE, "PNG"), "label": 3, "other": 1.0},
    )
    assert sorted(out) == ["_converted", "_seed", "image", "label"]
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    np.testing.assert_allclose(out["image"], _pil_resize(IMAGE, (16, 16)) / 255, atol=1.5 / 255)


def test_parse_accepts_empty_multiline_and_keyword_args():
    assert _run("", {"x": 1})["x"] == 1
    out = _run(
        """
        copy('x', 'y') |
        onehot(4, key='y', on=0.9, off=0.1)
    """,
        {"x": 2},
    )
    np.testing.assert_allclose(out["y"], [0.1, 0.1, 0.9, 0.1])


def test_unknown_op_names_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'value_range'"):
        pp.parse("decode|value_rang(-1, 1)")
    with pytest.raises(ValueError, match="Did you mean 'resize_small'"):
        pp.parse("resize_smal(8)")


def test_op_modules_come_from_the_config():
    """An op outside the engine needs its module in `pp_modules` (or a qualified name); errors say so."""
    with pytest.raises(
        ConfigError, match=r"Unknown pp op 'fold_strip'.*Modules searched: \[.*'transfer.pp'"
    ):
        pp.parse("decode|fold_strip(2)")
    with pytest.raises(ConfigError, match="config.pp_modules"):
        pp.parse("decode|fold_strip(2)")
    with pytest.raises(ConfigError, match="'tasks.no_such_pp'.*cannot be imported"):
        pp.parse("decode", ["tasks.no_such_pp"])
    strip = {"image": np.zeros((4, 8, 3), np.uint8)}
    assert _run("tasks.ocr_pp.fold(2)", strip)["image"].shape == (8, 4, 3)
    pp.parse("fold(2)", ["tasks.ocr_pp"])


def test_cache_marker_splits_without_moving_seeds():
    """prefix then rest == the whole string, random ops included; one marker at most."""
    example = {"image": tf.constant(IMAGE), "_seed": tf.constant([7, 11], tf.int64)}
    whole = pp.parse("resize(8)|random_crop(4)|flip_lr")(example)
    prefix, rest = pp.parse_cached("resize(8)|cache|random_crop(4)|flip_lr")
    split = rest(prefix({"image": example["image"]}) | {"_seed": example["_seed"]})
    np.testing.assert_array_equal(split["image"], whole["image"])
    np.testing.assert_array_equal(
        pp.parse("resize(8)|cache|random_crop(4)|flip_lr")(example)["image"], whole["image"]
    )
    shifted = pp.parse("resize(8)|keep('image', '_seed')|random_crop(4)|flip_lr")(example)
    assert not np.array_equal(
        shifted["image"], whole["image"]
    )  # An op, unlike `cache`, moves them.
    assert pp.parse_cached("resize(8)")[0] is None
    with pytest.raises(ConfigError, match="more than one `cache`"):
        pp.parse_cached("decode|cache|resize(8)|cache")


def test_parse_never_evaluates_code():
    with pytest.raises(ValueError, match="not a Python literal"):
        pp.parse("resize(__import__('os').getpid())")
    with pytest.raises(ValueError, match="Cannot parse"):
        pp.parse("resize(8")


def test_dotted_op_names_import_their_module():
    assert _run("transfer.pp.resize(8)", {"image": IMAGE})["image"].shape == (8, 8, 3)


def test_register_rejects_clashing_names():
    with pytest.raises(ValueError, match="already registered"):
        pp.register("resize")(lambda: None)


# ----------------------------------------------------------------------------- decode


def test_decode_png_jpeg_and_conversions():
    rgba = RNG.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    jpeg = _encode(IMAGE, "JPEG", quality=95)
    cases = {
        "png": (_encode(IMAGE, "PNG"), IMAGE, 0, 0),
        "gray": (_encode(rgba[..., 0], "PNG"), np.repeat(rgba[..., :1], 3, -1), 1, 0),
        "rgba": (_encode(rgba, "PNG"), rgba[..., :3], 1, 0),
        "jpeg": (jpeg, np.asarray(Image.open(io.BytesIO(jpeg))), 0, 2),
    }
    for name, (data, expected, converted, atol) in cases.items():
        out = _run("decode", {"image": data})
        assert out["image"].dtype == np.uint8 and out["image"].shape[-1] == 3, name
        assert out["_converted"] == converted, name
        if atol:
            assert np.abs(out["image"].astype(int) - expected).mean() < atol, name
        else:
            np.testing.assert_array_equal(out["image"], expected, err_msg=name)


def test_decode_cmyk_jpeg_to_rgb():
    cmyk = _encode(RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8), "JPEG", "CMYK", quality=95)
    expected = np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")).astype(int)
    out = _run("decode", {"image": cmyk})
    assert out["_converted"] == 1
    assert np.abs(out["image"].astype(int) - expected).max() <= 10


def test_decode_normalises_decoded_tensors():
    out = _run("decode", {"image": IMAGE})
    np.testing.assert_array_equal(out["image"], IMAGE)
    assert out["_converted"] == 0
    out = _run("decode", {"image": IMAGE[..., :1]})
    np.testing.assert_array_equal(out["image"], np.repeat(IMAGE[..., :1], 3, -1))
    assert out["_converted"] == 1


def test_decode_fails_on_truncated_bytes():
    data = _encode(IMAGE, "JPEG")
    with pytest.raises(tf.errors.InvalidArgumentError):
        _run("decode", {"image": data[: len(data) // 2]})


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size, hw", [(16, (16, 16)), ((12, 40), (12, 40))])
def test_resize_matches_pil_bilinear(size, hw):
    out = _run(f"resize({size})", {"image": IMAGE})["image"]
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - _pil_resize(IMAGE, hw)).max() <= 1


def test_resize_upsampling_fast_path_matches_antialiased_kernel():
    out = _run("resize((48, 40))", {"image": IMAGE})["image"].astype(int)
    reference = tf.image.resize(IMAGE, (48, 40), antialias=True).numpy()
    assert np.abs(out - np.clip(np.round(reference), 0, 255)).max() <= 1


def test_resize_small_keeps_aspect_ratio():
    out = _run("resize_small(12)", {"image": IMAGE})["image"]
    assert out.shape == (12, 16, 3)
    assert np.abs(out.astype(int) - _pil_resize(IMAGE, (12, 16))).max() <= 1


def test_central_crop():
    out = _run("central_crop((10, 20))", {"image": IMAGE})["image"]
    np.testing.assert_array_equal(out, IMAGE[7:17, 6:26])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):  # Static or dynamic.
        _run("central_crop(64)", {"image": IMAGE})


def _find_window(crop, image):
    h, w = crop.shape[:2]
    return [
        (y, x)
        for y in range(image.shape[0] - h + 1)
        for x in range(image.shape[1] - w + 1)
        if np.array_equal(image[y : y + h, x : x + w], crop)
    ]


def test_random_crop_is_a_window_and_seeded():
    crops = [_run("random_crop(8)", {"image": IMAGE}, seed=(0, s))["image"] for s in range(6)]
    assert all(c.shape == (8, 8, 3) and _find_window(c, IMAGE) for c in crops)
    again = _run("random_crop(8)", {"image": IMAGE}, seed=(0, 0))["image"]
    np.testing.assert_array_equal(crops[0], again)
    assert len({c.tobytes() for c in crops}) > 1


def test_random_crop_same_window_for_all_keys():
    out = _run("random_crop(8, key=('image', 'mask'))", {"image": IMAGE, "mask": IMAGE.copy()})
    np.testing.assert_array_equal(out["image"], out["mask"])


def test_inception_crop_area_and_size():
    for s in range(5):
        out = _run("inception_crop(area_min=50)", {"image": IMAGE}, seed=(3, s))["image"]
        assert out.shape[0] * out.shape[1] >= 0.45 * IMAGE.shape[0] * IMAGE.shape[1]
        assert _find_window(out, IMAGE)
    out = _run("inception_crop(16)", {"image": IMAGE})["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_flip_lr_flips_or_not_by_seed():
    outs = [_run("flip_lr", {"image": IMAGE}, seed=(5, s))["image"] for s in range(16)]
    flipped = [np.array_equal(o, IMAGE[:, ::-1]) for o in outs]
    assert all(f or np.array_equal(o, IMAGE) for f, o in zip(flipped, outs, strict=True))
    assert 0 < sum(flipped) < 16


def test_random_ops_do_not_share_randomness():
    """Two flips in a row must not always cancel out (each op folds in its own position)."""
    outs = [_run("flip_lr|flip_lr", {"image": IMAGE}, seed=(7, s))["image"] for s in range(16)]
    assert any(not np.array_equal(o, IMAGE) for o in outs)


def test_random_op_without_seed_explains():
    with pytest.raises(KeyError, match="_seed"):
        pp.parse("flip_lr")({"image": tf.constant(IMAGE)})


# ----------------------------------------------------------------------------- values & keys


def test_value_range():
    out = _run("value_range(-1, 1)", {"image": IMAGE})["image"]
    np.testing.assert_allclose(out, IMAGE / 127.5 - 1, atol=1e-6)
    out = _run("value_range(0, 1, in_min=100, in_max=200, clip_values=True)", {"image": IMAGE})
    np.testing.assert_allclose(out["image"], np.clip((IMAGE - 100.0) / 100, 0, 1), atol=1e-6)


def test_onehot_single_and_multi_label():
    out = _run("onehot(5, key_result='labels')", {"label": 2})
    np.testing.assert_array_equal(out["labels"], np.eye(5)[2])
    assert out["label"] == 2
    out = _run("onehot(4)", {"label": np.array([0, 3])})
    np.testing.assert_array_equal(out["label"], [1, 0, 0, 1])


def test_keep_drop_copy_rename():
    example = {"image": IMAGE, "label": 1, "id": 7}
    assert sorted(_run("keep('label')", example)) == ["_seed", "label"]
    assert sorted(_run("drop('image', 'id')", example)) == ["_seed", "label"]
    out = _run("copy('label', 'y')|rename(target='id')", example)
    assert out["y"] == 1 and out["target"] == 7 and "id" not in out
    with pytest.raises(KeyError, match="missing"):
        _run("keep('nope')", example)
    with pytest.raises(ValueError, match="internal"):
        pp.parse("drop('_seed')")


def test_flatten_and_choice():
    texts = np.array([b"a", b"b", b"c"])
    example = {"captions": {"text": texts, "id": np.array([0, 1, 2])}}
    picks = set()
    for s in range(12):
        out = _run("flatten|choice(key=('captions/text', 'captions/id'))", example, seed=(1, s))
        assert texts[out["captions/id"]] == out["captions/text"]
        picks.add(out["captions/text"])
    assert picks == {b"a", b"b", b"c"}
    out = _run("flatten|choice('captions/text', n=3, outkey='t')", example)
    assert sorted(out["t"]) == [b"a", b"b", b"c"]

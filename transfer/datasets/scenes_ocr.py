"""`scenes_ocr`: one or two common English words rendered on a 32x128 strip; target `text`.

The text is drawn with Pillow's bundled default font (`ImageFont.load_default(size=...)`, a
FreeType font shipped inside Pillow, so nothing is downloaded), at a random size, offset, case,
and colour pair with enough luminance contrast to stay legible, on a plain or gradient
background with light pixel noise. `text` is exactly the string drawn, including its case.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from transfer.datasets import render

HEIGHT, WIDTH = 32, 128
_MARGIN = 2
_FONT_SIZES = tuple(range(11, 21))
_MIN_CONTRAST = 90.0  # luminance difference between text and background

WORDS: tuple[str, ...] = tuple(
    """
    able about above after again air all also always animal answer apple area arm art ask away
    baby back ball band bank base bear bed bell best bird black blue boat body bone book box boy
    bread bring brown build busy cake call came car card care cat chair child city class clean
    clock cloud coat cold come cook cool corn cow cup dance dark day deep desk dog door down draw
    dream dress drink drive duck early earth east easy eat egg end eye face fall farm fast fish
    five flag floor flower fly food foot forest four fox free friend frog fruit full game garden
    gift girl glass gold good grass green grow hair hand happy hat head heart hill home horse
    house ice idea iron jump key king lake lamp land large leaf left light line lion long low
    map milk moon mouse music name near nest new night north nose note ocean old open orange
    paper park party pen pink plant play queen quick rain red ring river road rock roof room rose
    run salt sand sea seed ship shoe shop sing sky sleep slow small snow song south star stone
    street sun table tall tea tiger time tree two under water west white wind window winter wolf
    wood word world yard year yellow young zebra zero
    """.split()
)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The default font at `size`; falls back to the fixed bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _text_size(text: str, size: int) -> tuple[int, int, int, int]:
    """Ink bounding box (left, top, right, bottom) of `text` drawn at the origin."""
    left, top, right, bottom = _font(size).getbbox(text)
    return int(left), int(top), int(right), int(bottom)


def _fits(text: str, size: int) -> bool:
    left, top, right, bottom = _text_size(text, size)
    return right - left <= WIDTH - 2 * _MARGIN and bottom - top <= HEIGHT - 2 * _MARGIN


def sample_text(rng: np.random.Generator) -> tuple[str, int]:
    """A 1-2 word string and a font size at which it fits the strip."""
    n_words = 1 if rng.uniform() < 0.65 else 2
    words = [WORDS[int(i)] for i in rng.integers(len(WORDS), size=n_words)]
    case = rng.choice(3, p=[0.6, 0.25, 0.15])
    words = [w.capitalize() if case == 1 else w.upper() if case == 2 else w for w in words]
    text = " ".join(words)
    sizes = [s for s in _FONT_SIZES if _fits(text, s)]
    if not sizes:  # two long upper-case words: keep the first one only
        text = words[0]
        sizes = [s for s in _FONT_SIZES if _fits(text, s)] or [_FONT_SIZES[0]]
    return text, int(sizes[int(rng.integers(len(sizes)))])


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and text colours with at least `_MIN_CONTRAST` luminance difference."""
    while True:
        background, ink = rng.uniform(0, 255, size=(2, 3))
        if abs(_luminance(background) - _luminance(ink)) >= _MIN_CONTRAST:
            return background, ink


def render_text(text: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `text` at a random offset as a uint8 (32, 128, 3) array."""
    background, ink = _colors(rng)
    left, top, right, bottom = _text_size(text, size)
    x = rng.integers(_MARGIN, max(_MARGIN, WIDTH - _MARGIN - (right - left)) + 1) - left
    y = rng.integers(_MARGIN, max(_MARGIN, HEIGHT - _MARGIN - (bottom - top)) + 1) - top
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).text((int(x), int(y)), text, fill=255, font=_font(size))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    image = np.broadcast_to(background, (HEIGHT, WIDTH, 3)).astype(np.float32)
    if rng.uniform() < 0.4:  # a horizontal shading keeps the background from being constant
        image = image + np.linspace(-1.0, 1.0, WIDTH)[None, :, None] * rng.uniform(-20, 20)
    image = image * (1.0 - alpha) + ink[None, None, :] * alpha
    return render.add_noise(rng, image, rng.uniform(0, 6))


def make_example(name: str, split: str, index: int) -> dict:
    """One `scenes_ocr` example, a pure function of (dataset name, split, index)."""
    rng = render.example_rng(name, split, index)
    text, size = sample_text(rng)
    return {
        "image": render.encode_jpeg(render_text(text, size, rng)),
        "image/id": render.image_id(split, index),
        "text": text,
    }


class ScenesOcr(render.LocalBuilder):
    """Rendered words for text reading; generated locally, no download."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(HEIGHT, WIDTH, 3), encoding_format="jpeg"),
                "image/id": np.int64,
                "text": tfds.features.Text(),
            }
        )
        return self.dataset_info_from_configs(
            description=__doc__, features=features, supervised_keys=("image", "text")
        )

    def make_example(self, split: str, index: int) -> dict:
        return make_example(self.name, split, index)

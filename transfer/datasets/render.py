"""Shared pieces of the embedded datasets: scene sampling, Pillow rendering, seeds, split sizes.

The three builders (`scenes`, `scenes_vqa`, `scenes_ocr`) must produce the same bytes on every
machine and every run, without any download. Everything random therefore flows from one
`numpy.random.Generator` per example, seeded from (dataset name, split name, index) through a
stable checksum (never Python's salted `hash`), and images are JPEG-encoded here by Pillow so
that the TFDS writer stores exactly these bytes.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Shapes are drawn at this multiple of the final resolution and box-filtered down, which gives
# anti-aliased edges: at 64x64 a hard-edged 5-pixel star would be hard to tell from a cross.
_SUPERSAMPLE = 4

# Named colours, chosen to be pairwise distinguishable on both the dark and light backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 25),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "purple": (140, 45, 185),
    "pink": (245, 120, 185),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Region centres (x, y) in pixels. Every object gets its own region, so "the shape on the left" is always
# well defined, but its centre is drawn anywhere within +-_JITTER of the region's centre and its size from a
# wide range: neighbours overlap (occlusion), large objects run off the edge, and nothing sits on the 16-px
# patch grid. Positions, scales, rotations, clutter and textured backgrounds are what make raw pixels and
# random features weak on these images, as on photographs (see scenes.py for the measured numbers).
_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (15.0, 32.0),
    "right": (49.0, 32.0),
    "top": (32.0, 15.0),
    "bottom": (32.0, 49.0),
    "center": (32.0, 32.0),
}
_RADIUS = {"small": (3.5, 6.5), "large": (8.5, 14.0)}
_JITTER = 7.0  # pixels of position jitter around a region centre, per axis
# Degrees of rotation: squares and diamonds turn a little (a square at 45 degrees is a rhombus), the rest freely.
_MAX_ANGLE = {"square": 20.0, "diamond": 20.0}
_FREE_ANGLE = 180.0
BACKGROUND_TONES = ("dark", "light")
BACKGROUND_STYLES = ("plain", "gradient", "grainy", "striped", "checkered", "mottled")
_STYLE_PROBS = (0.15, 0.15, 0.15, 0.2, 0.15, 0.2)
MAX_CLUTTER = 5  # thin lines and dots in arbitrary colours that no caption counts as a shape
NUMERAL_PROB = 0.5  # a written digit in a free region ("the number 7"), which captions name
_NUMERAL_SIZES = ((11, 19), (24, 44))  # font px: a small label or a large painted number, half each

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object; `radius` is the half-extent in pixels of the 64x64 image."""

    shape: str
    color: str
    size: str
    position: str
    x: float
    y: float
    radius: float
    angle: float


@dataclasses.dataclass(frozen=True)
class Stroke:
    """A clutter line (or a dot when both ends coincide), drawn under or over the objects."""

    points: tuple[float, float, float, float]
    width: float
    rgb: tuple[float, float, float]
    on_top: bool


@dataclasses.dataclass(frozen=True)
class Numeral:
    """A digit written in a free region; captions call it "the number 7"."""

    digit: int
    position: str
    x: float
    y: float
    size: int
    angle: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene: `objects[0]` is the main object, the only large one; the rest are small."""

    objects: tuple[SceneObject, ...]
    tone: str
    style: str
    clutter: tuple[Stroke, ...] = ()
    numeral: Numeral | None = None

    @property
    def main(self) -> SceneObject:
        return self.objects[0]


@dataclasses.dataclass(eq=False)
class SplitSizesConfig(tfds.core.BuilderConfig):
    """Builder config that only sets the number of examples per split.

    Tests and demos pick the `tiny` config (or pass their own instance with a new name) to
    generate a dataset in a fraction of a second instead of the full-size default.
    """

    train: int = 5000
    validation: int = 500
    test: int = 500

    def sizes(self) -> dict[str, int]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the embedded builders: every split is generated from per-example seeds, no download.

    A subclass defines `_info` and `make_example(split, index) -> dict`.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "2.0.0": "Scenes vary in position, scale, rotation and occlusion, with clutter, textured "
        "backgrounds and written digits.",
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.BUILDER_CONFIGS = default_configs()  # Each builder needs its own config instances.

    def make_example(self, split: str, index: int) -> dict:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(split, size)
            for split, size in self.builder_config.sizes().items()
        }

    def _generate_examples(self, split: str, size: int):
        for index in range(size):
            yield index, self.make_example(split, index)


def default_configs() -> list[SplitSizesConfig]:
    """Fresh `default` and `tiny` configs (each builder class needs its own instances)."""
    return [
        SplitSizesConfig(name="default", description="5,000 / 500 / 500 examples."),
        SplitSizesConfig(
            name="tiny", train=64, validation=16, test=16, description="64 / 16 / 16 examples."
        ),
    ]


def example_rng(dataset: str, split: str, index: int) -> np.random.Generator:
    """The generator for one example: independent of generation order and of the process."""
    seed = [zlib.crc32(dataset.encode()), zlib.crc32(split.encode()), index]
    return np.random.default_rng(seed)


def image_id(split: str, index: int) -> int:
    """Ids unique across splits, so a mixed evaluation set never has two images with one id."""
    offset = {"train": 0, "validation": 1_000_000, "test": 2_000_000}[split]
    return offset + index


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of a uint8 HxWx3 array.

    JPEG rather than PNG: the grain makes PNG ~3x larger and ~10x slower to encode. Quality 95
    without chroma subsampling keeps the colour of 5-pixel shapes and thin glyphs intact.
    """
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """A uniformly random element (numpy's `choice` would turn tuples and objects into arrays)."""
    return options[int(rng.integers(len(options)))]


def _sample_object(
    rng: np.random.Generator, shape: str, color: str, size: str, position: str
) -> SceneObject:
    low, high = _RADIUS[size]
    ax, ay = _ANCHORS[position]
    max_angle = _MAX_ANGLE.get(shape, _FREE_ANGLE)
    return SceneObject(
        shape=shape,
        color=color,
        size=size,
        position=position,
        x=float(ax + rng.uniform(-_JITTER, _JITTER)),
        y=float(ay + rng.uniform(-_JITTER, _JITTER)),
        radius=float(rng.uniform(low, high)),
        angle=float(rng.uniform(-max_angle, max_angle)),
    )


def _distractor_kind(rng, main: SceneObject, previous: list[SceneObject]) -> tuple[str, str]:
    """Shape and colour of a distractor.

    Distractors often repeat the main object's colour or shape, or an earlier distractor, so the
    label cannot be read off "the most frequent colour" and captions get real groups ("two red
    stars").
    """
    roll = rng.uniform()
    if roll < 0.2:
        return main.shape, pick(rng, COLOR_NAMES)
    if roll < 0.4:
        return pick(rng, SHAPES), main.color
    if roll < 0.6 and len(previous) > 1:
        twin = previous[1 + int(rng.integers(len(previous) - 1))]
        return twin.shape, twin.color
    return pick(rng, SHAPES), pick(rng, COLOR_NAMES)


def _sample_clutter(rng: np.random.Generator) -> tuple[Stroke, ...]:
    """0..MAX_CLUTTER thin lines and dots in arbitrary colours (a third of them over the objects)."""
    strokes = []
    for _ in range(int(rng.integers(MAX_CLUTTER + 1))):
        x0, y0 = rng.uniform(0, IMAGE_SIZE, size=2)
        if rng.uniform() < 0.3:  # a dot
            x1, y1, width = x0, y0, float(rng.uniform(1.5, 3.0))
        else:
            length, theta = rng.uniform(8, 40), rng.uniform(0, 2 * np.pi)
            x1, y1 = x0 + length * np.cos(theta), y0 + length * np.sin(theta)
            width = float(rng.uniform(0.6, 1.6))
        rgb = tuple(float(v) for v in rng.uniform(0, 255, size=3))
        on_top = bool(rng.uniform() < 1 / 3)
        strokes.append(Stroke((float(x0), float(y0), float(x1), float(y1)), width, rgb, on_top))
    return tuple(strokes)


def _sample_numeral(rng: np.random.Generator, free: list[str]) -> Numeral | None:
    if not free or rng.uniform() >= NUMERAL_PROB:
        return None
    position = pick(rng, free)
    ax, ay = _ANCHORS[position]
    jitter = _JITTER / 2
    return Numeral(
        digit=int(rng.integers(10)),
        position=position,
        x=float(ax + rng.uniform(-jitter, jitter)),
        y=float(ay + rng.uniform(-jitter, jitter)),
        size=int(rng.integers(*_NUMERAL_SIZES[int(rng.integers(2))])),
        angle=float(rng.uniform(-25, 25)),
    )


def sample_scene(rng: np.random.Generator, max_objects: int = 4) -> Scene:
    """1..max_objects objects in distinct regions: one large main object plus small distractors, over a
    background with clutter, sometimes with a written digit in a free region."""
    count = int(rng.integers(1, max_objects + 1))
    order = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))]
    slots = order[:count]
    objects = [_sample_object(rng, pick(rng, SHAPES), pick(rng, COLOR_NAMES), "large", slots[0])]
    for slot in slots[1:]:
        shape, color = _distractor_kind(rng, objects[0], objects)
        objects.append(_sample_object(rng, shape, color, "small", slot))
    style = BACKGROUND_STYLES[int(rng.choice(len(BACKGROUND_STYLES), p=_STYLE_PROBS))]
    return Scene(
        objects=tuple(objects),
        tone=pick(rng, BACKGROUND_TONES),
        style=style,
        clutter=_sample_clutter(rng),
        numeral=_sample_numeral(rng, order[count:]),
    )


def _rotate(points: np.ndarray, angle_deg: float) -> np.ndarray:
    theta = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return points @ rotation.T


def _unit_outline(shape: str) -> np.ndarray:
    """Polygon of a shape of half-extent ~1 centred on the origin (y axis points down)."""
    if shape == "square":
        return np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]])
    if shape == "diamond":  # a tall rhombus, so it differs from a rotated square
        return np.array([[0.0, -1.15], [0.72, 0.0], [0.0, 1.15], [-0.72, 0.0]])
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return 1.15 * np.stack([np.cos(angles), np.sin(angles) + 0.15], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.15, 0.48)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        a, w = 1.0, 0.34
        return np.array(
            [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
             [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]]
        )  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _object_mask(obj: SceneObject) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one object, shape (IMAGE_SIZE, IMAGE_SIZE).

    Only the object's bounding square is rasterised (supersampled, then box-filtered), which is
    several times cheaper than supersampling the whole image.
    """
    reach = obj.radius * 1.3
    x0, y0 = max(0, int(obj.x - reach)), max(0, int(obj.y - reach))
    x1, y1 = min(IMAGE_SIZE, int(obj.x + reach) + 2), min(IMAGE_SIZE, int(obj.y + reach) + 2)
    canvas = Image.new("L", ((x1 - x0) * _SUPERSAMPLE, (y1 - y0) * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = (obj.x - x0) * _SUPERSAMPLE, (obj.y - y0) * _SUPERSAMPLE
    r = obj.radius * _SUPERSAMPLE
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        points = _rotate(_unit_outline(obj.shape), obj.angle) * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    crop = canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    mask[y0:y1, x0:x1] = np.asarray(crop, dtype=np.float32) / 255.0
    return mask


def _texture(rng: np.random.Generator, style: str, height: int, width: int) -> np.ndarray:
    """A zero-mean HxW pattern in about [-1, 1]: stripes, a checkerboard or low-frequency blotches."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if style == "striped":
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        phase = (np.cos(theta) * xs + np.sin(theta) * ys) * 2 * np.pi / period
        return np.sin(phase + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    if style == "checkered":
        cell = rng.uniform(4, 11)
        u, v = (xs + rng.uniform(0, cell)) // cell, (ys + rng.uniform(0, cell)) // cell
        return (((u + v) % 2) * 2 - 1).astype(np.float32)
    if style == "mottled":
        coarse = rng.standard_normal(size=(6, 6)).astype(np.float32)
        blotches = np.asarray(
            Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        )
        return blotches / (np.abs(blotches).max() + 1e-6)
    return np.zeros((height, width), np.float32)


def _background(rng: np.random.Generator, tone: str, style: str, size: tuple[int, int]):
    """A float32 HxWx3 background: a tinted grey, with a gradient or a tinted texture for some styles."""
    height, width = size
    level = rng.uniform(20, 70) if tone == "dark" else rng.uniform(170, 225)
    base = level + rng.uniform(-20, 20, size=3)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if style == "gradient":
        direction = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (np.cos(direction) * xs / width + np.sin(direction) * ys / height) - 0.5
        image = image + ramp[..., None] * rng.uniform(25, 45)
    elif style in ("striped", "checkered", "mottled"):
        tint = rng.uniform(0.4, 1.0, size=3) * rng.choice([-1.0, 1.0], size=3)
        image = image + _texture(rng, style, height, width)[..., None] * rng.uniform(12, 28) * tint
    return image


def add_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian pixel noise, then clip and round to uint8."""
    if sigma > 0:
        image = image + sigma * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _strokes_mask(strokes: Sequence[Stroke]) -> list[np.ndarray]:
    """Anti-aliased coverage of each clutter stroke (supersampled, then box-filtered)."""
    masks = []
    s = _SUPERSAMPLE
    for stroke in strokes:
        canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
        draw = ImageDraw.Draw(canvas)
        x0, y0, x1, y1 = (v * s for v in stroke.points)
        w = stroke.width * s
        if (x0, y0) == (x1, y1):
            draw.ellipse([x0 - w, y0 - w, x0 + w, y0 + w], fill=255)
        else:
            draw.line([x0, y0, x1, y1], fill=255, width=max(1, int(round(w))))
        small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        masks.append(np.asarray(small, dtype=np.float32) / 255.0)
    return masks


def _numeral_mask(numeral: Numeral) -> np.ndarray:
    """Coverage of a digit drawn with Pillow's bundled font, rotated about its centre."""
    from PIL import ImageFont

    s = _SUPERSAMPLE
    try:
        font = ImageFont.load_default(size=numeral.size * s)
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    side = IMAGE_SIZE * s
    glyph = Image.new("L", (side, side), 0)
    ImageDraw.Draw(glyph).text(
        (side / 2, side / 2), str(numeral.digit), fill=255, font=font, anchor="mm"
    )
    glyph = glyph.rotate(numeral.angle, resample=Image.Resampling.BILINEAR)
    shifted = Image.new("L", (side, side), 0)
    shifted.paste(
        glyph, (int((numeral.x - IMAGE_SIZE / 2) * s), int((numeral.y - IMAGE_SIZE / 2) * s))
    )
    small = shifted.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _paint(image: np.ndarray, alpha: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    alpha = alpha[..., None]
    return image * (1.0 - alpha) + rgb[None, None, :] * alpha


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene as a uint8 (64, 64, 3) array: background, clutter under, the main object, the
    distractors (which may overlap it), the digit, clutter over, noise.

    Object colours are jittered per channel so that a colour name covers a range of RGB values,
    not a single one a probe could memorise.
    """
    image = _background(rng, scene.tone, scene.style, (IMAGE_SIZE, IMAGE_SIZE))
    strokes = _strokes_mask(scene.clutter)
    for stroke, mask in zip(scene.clutter, strokes, strict=True):
        if not stroke.on_top:
            image = _paint(image, mask, np.array(stroke.rgb, np.float32))
    for obj in scene.objects:
        jitter = rng.uniform(-18, 18, size=3)
        color = np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255).astype(np.float32)
        image = _paint(image, _object_mask(obj), color)
    if scene.numeral is not None:
        ink = 235.0 if scene.tone == "dark" else 25.0
        image = _paint(image, _numeral_mask(scene.numeral), np.full(3, ink, np.float32))
    for stroke, mask in zip(scene.clutter, strokes, strict=True):
        if stroke.on_top:
            image = _paint(image, mask, np.array(stroke.rgb, np.float32))
    sigma = rng.uniform(5, 9) if scene.style == "grainy" else rng.uniform(0, 2.5)
    return add_noise(rng, image, sigma)


def objects_feature() -> tfds.features.Sequence:
    """The `objects` feature shared by `scenes` and `scenes_vqa`."""
    return tfds.features.Sequence(
        {
            "shape": tfds.features.ClassLabel(names=SHAPES),
            "color": tfds.features.ClassLabel(names=COLOR_NAMES),
            "size": tfds.features.ClassLabel(names=SIZES),
            "position": tfds.features.ClassLabel(names=POSITIONS),
            "bbox": tfds.features.BBoxFeature(),
        }
    )


def encode_objects(scene: Scene) -> dict[str, list]:
    """`objects` feature values; bbox is (ymin, xmin, ymax, xmax) normalised, clipped to [0, 1]."""
    boxes = []
    for obj in scene.objects:
        extent = obj.radius * 1.2
        box = [obj.y - extent, obj.x - extent, obj.y + extent, obj.x + extent]
        boxes.append(tfds.features.BBox(*np.clip(np.array(box) / IMAGE_SIZE, 0.0, 1.0).tolist()))
    return {
        "shape": [o.shape for o in scene.objects],
        "color": [o.color for o in scene.objects],
        "size": [o.size for o in scene.objects],
        "position": [o.position for o in scene.objects],
        "bbox": boxes,
    }

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
# Slot centres (x, y) in pixels; every object gets its own slot, so "the shape on the left" is
# always well defined. Only the centre slot can touch a neighbour, by a few pixels at most.
_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (15.0, 32.0),
    "right": (49.0, 32.0),
    "top": (32.0, 15.0),
    "bottom": (32.0, 49.0),
    "center": (32.0, 32.0),
}
_RADIUS = {"small": (4.5, 6.5), "large": (9.5, 12.5)}
_JITTER = 2.5  # pixels of position jitter around a slot centre
_MAX_ANGLE = 12.0  # degrees; small enough that a square never turns into a diamond
BACKGROUND_TONES = ("dark", "light")
BACKGROUND_STYLES = ("plain", "gradient", "grainy")

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
class Scene:
    """A scene: `objects[0]` is the main object, the only large one; the rest are small."""

    objects: tuple[SceneObject, ...]
    tone: str
    style: str

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

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

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
    return SceneObject(
        shape=shape,
        color=color,
        size=size,
        position=position,
        x=float(ax + rng.uniform(-_JITTER, _JITTER)),
        y=float(ay + rng.uniform(-_JITTER, _JITTER)),
        radius=float(rng.uniform(low, high)),
        angle=float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE)),
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


def sample_scene(rng: np.random.Generator, max_objects: int = 4) -> Scene:
    """1..max_objects objects in distinct slots: one large main object plus small distractors."""
    count = int(rng.integers(1, max_objects + 1))
    slots = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:count]]
    objects = [_sample_object(rng, pick(rng, SHAPES), pick(rng, COLOR_NAMES), "large", slots[0])]
    for slot in slots[1:]:
        shape, color = _distractor_kind(rng, objects[0], objects)
        objects.append(_sample_object(rng, shape, color, "small", slot))
    style = BACKGROUND_STYLES[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
    return Scene(objects=tuple(objects), tone=pick(rng, BACKGROUND_TONES), style=style)


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


def _background(rng: np.random.Generator, tone: str, style: str, size: tuple[int, int]):
    """A float32 HxWx3 background: a tinted grey, optionally with a linear gradient."""
    height, width = size
    level = rng.uniform(20, 70) if tone == "dark" else rng.uniform(170, 225)
    base = level + rng.uniform(-12, 12, size=3)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    if style == "gradient":
        direction = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (np.cos(direction) * xs / width + np.sin(direction) * ys / height) - 0.5
        image = image + ramp[..., None] * rng.uniform(25, 45)
    return image


def add_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian pixel noise, then clip and round to uint8."""
    if sigma > 0:
        image = image + sigma * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene as a uint8 (64, 64, 3) array; the main object first, distractors on top.

    Object colours are jittered per channel so that a colour name covers a range of RGB values,
    not a single one a probe could memorise.
    """
    image = _background(rng, scene.tone, scene.style, (IMAGE_SIZE, IMAGE_SIZE))
    for obj in scene.objects:
        jitter = rng.uniform(-18, 18, size=3)
        color = np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255).astype(np.float32)
        alpha = _object_mask(obj)[..., None]
        image = image * (1.0 - alpha) + color[None, None, :] * alpha
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

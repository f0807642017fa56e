"""`scenes`: rendered shape scenes with five different captions each and probing labels.

Each 64x64 image shows one large "main" object and 0-3 small distractors (6 shapes x 7 colours,
one of five regions each), like a photograph in the ways that matter to a probe (version 2.0.0): positions
vary by +-7 px around the regions (off the patch grid), sizes over a wide range, shapes rotate freely (squares
and diamonds by up to 20 degrees), neighbours overlap and large objects run off the edge, thin lines and dots
in arbitrary colours clutter the image (some over the objects), half the images carry a written digit (small, or
large and over the objects), and backgrounds are dark or light, plain, shaded, grainy, striped, checkered or
mottled. Details: render.py.

Probes of raw pixels and of a random-init tiny tower are weak on it (the 1.0.0 images, one object per fixed slot
on the patch borders, gave the random tower 35 % at 25 shots); closed-form few-shot top-1 %, 10 / 25 shots, mean
over 3 seeds (benchmarks/demo_sweep.py, docs/demo_sweep.md):

    features                    label (42)    shape (6)     colour (7)    count (4)
    raw pixels (12,288)         7.6 / 10.7    18.1 / 19.8   37.9 / 44.1   24.5 / 26.2
    random-init tiny tower      9.4 / 13.4    16.6 / 16.0   29.3 / 42.0   25.8 / 25.5
    CapPa tiny tower (demo)    19.8 / 22.3    20.4 / 21.7   77.1 / 84.0   32.0 / 30.1

(2026-12-07; pixels on all 5,000 train images, the towers on the demo's 3,000; chance 2.4 / 16.7 / 14.3 / 25 %.)

Labels, chosen so that a linear probe needs real visual features:

* `label` (42 classes): shape x colour of the main (largest) object, index
  `shape_index * 7 + color_index`, name e.g. `"red circle"`. Distractors often share the main
  object's shape or colour, so the label requires finding the large object and reading both
  its shape and its colour.
* `shape` (6 classes) and `color` (7 classes): the two factors of `label`.
* `count` (4 classes, names "1".."4"): number of objects; class index = count - 1.

Captions follow the `coco_captions` layout; every caption names the main object's colour and
shape, and the five captions of an image use different templates (lists, spatial relations,
positions, counts, background).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from transfer.datasets import render
from transfer.datasets.render import Scene, SceneObject, pick

NUM_CAPTIONS = 5
LABEL_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s in render.SHAPES for c in render.COLOR_NAMES)
COUNT_NAMES: tuple[str, ...] = ("1", "2", "3", "4")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {"cross": "crosses"}
# How a caption says where a slot is.
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
_TEXTURE_WORDS = {
    "plain": "plain",
    "gradient": "shaded",
    "grainy": "grainy",
    "striped": "striped",
    "checkered": "checkered",
    "mottled": "mottled",
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def label_index(shape: str, color: str) -> int:
    """Index of the (shape, colour) class in `LABEL_NAMES`."""
    return render.SHAPES.index(shape) * len(render.COLOR_NAMES) + render.COLOR_NAMES.index(color)


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def join_phrases(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(objects: tuple[SceneObject, ...]) -> list[tuple[SceneObject, int]]:
    """Objects grouped by (size, colour, shape) in order of first appearance, with counts."""
    counts: dict[tuple[str, str, str], list] = {}
    for obj in objects:
        key = (obj.size, obj.color, obj.shape)
        counts.setdefault(key, [obj, 0])[1] += 1
    return [(obj, n) for obj, n in counts.values()]


def _phrase(obj: SceneObject, n: int, rng: np.random.Generator, size_prob: float = 0.6) -> str:
    """'a small red star', 'two blue crosses', ... (size adjective only sometimes)."""
    words = f"{obj.color} {obj.shape if n == 1 else plural(obj.shape)}"
    if rng.uniform() < size_prob:
        words = f"{_SIZE_WORDS[obj.size][int(rng.integers(2))]} {words}"
    return article(words) if n == 1 else f"{NUMBER_WORDS[n]} {words}"


def _main_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """The main object always says "large"/"big" next to others, so it is never ambiguous."""
    return _phrase(scene.main, 1, rng, size_prob=0.5 if len(scene.objects) == 1 else 1.0)


def _numeral_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """'the number 7', 'the digit seven', 'a written 7'."""
    digit = scene.numeral.digit
    word = str(digit) if rng.uniform() < 0.5 else DIGIT_WORDS[digit]
    return f"{pick(rng, ('the number', 'the digit', 'a written'))} {word}"


def _caption_list(scene: Scene, rng: np.random.Generator) -> str:
    """'a large red circle, two small blue stars and a green cross' (and 'the number 7', if written)."""
    groups = _groups(scene.objects[1:])
    phrases = [_main_phrase(scene, rng)] + [_phrase(obj, n, rng) for obj, n in groups]
    if scene.numeral is not None and rng.uniform() < 0.5:
        phrases.append(_numeral_phrase(scene, rng))
    return join_phrases(phrases)


def _caption_numeral(scene: Scene, rng: np.random.Generator) -> str | None:
    """'the number 7 at the top, next to a large red circle'."""
    if scene.numeral is None:
        return None
    where = WHERE[scene.numeral.position]
    return f"{_numeral_phrase(scene, rng)} {where}, next to {_main_phrase(scene, rng)}"


def _caption_list_reversed(scene: Scene, rng: np.random.Generator) -> str | None:
    """Distractors first: 'two blue stars next to a big red circle'."""
    groups = _groups(scene.objects[1:])
    if not groups:
        return None
    link = [" and ", " next to ", " with "][int(rng.integers(3))]
    return (
        join_phrases([_phrase(obj, n, rng) for obj, n in groups]) + link + _main_phrase(scene, rng)
    )


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`, along the axis of their largest offset (y points down)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _caption_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a large red circle to the left of a small blue star' (or the other way round)."""
    if len(scene.objects) < 2:
        return None
    other = scene.objects[1 + int(rng.integers(len(scene.objects) - 1))]
    if rng.uniform() < 0.5:
        return f"{_main_phrase(scene, rng)} {relation(scene.main, other)} {_phrase(other, 1, rng)}"
    return f"{_phrase(other, 1, rng)} {relation(other, scene.main)} {_main_phrase(scene, rng)}"


def _caption_positions(scene: Scene, rng: np.random.Generator) -> str:
    """'a red circle on the left and a small blue star at the top'."""
    parts = [f"{_phrase(o, 1, rng, size_prob=0.4)} {WHERE[o.position]}" for o in scene.objects[1:]]
    if scene.numeral is not None:
        parts.append(f"{_numeral_phrase(scene, rng)} {WHERE[scene.numeral.position]}")
    return join_phrases([f"{_main_phrase(scene, rng)} {WHERE[scene.main.position]}"] + parts)


def _caption_count(scene: Scene, rng: np.random.Generator) -> str:
    """'three shapes, the biggest one is a red circle' / 'a single red circle'."""
    n = len(scene.objects)
    main = f"{scene.main.color} {scene.main.shape}"
    if n == 1:
        return f"a single {main}"
    if rng.uniform() < 0.5:
        return f"{NUMBER_WORDS[n]} shapes, the biggest one is {article(main)}"
    others = "one other shape" if n == 2 else f"{NUMBER_WORDS[n - 1]} other shapes"
    return f"{article(main)} and {others}"


def _caption_background(scene: Scene, rng: np.random.Generator) -> str:
    """'a large red circle and two other shapes on a dark grainy background'."""
    n_others = len(scene.objects) - 1
    subject = _main_phrase(scene, rng)
    if n_others:
        subject += f" and {NUMBER_WORDS[n_others] if n_others > 1 else 'one'} other shape"
        subject += "s" if n_others > 1 else ""
    return f"{subject} on a {scene.tone} {_TEXTURE_WORDS[scene.style]} background"


def _caption_largest(scene: Scene, rng: np.random.Generator) -> str:
    """'the largest shape is a red circle, in the center'."""
    main = article(f"{scene.main.color} {scene.main.shape}")
    if len(scene.objects) == 1:
        return f"the only shape is {main}"
    return f"the largest shape is {main}, {WHERE[scene.main.position]}"


_TEMPLATES = (
    _caption_list,
    _caption_list_reversed,
    _caption_relation,
    _caption_positions,
    _caption_count,
    _caption_background,
    _caption_largest,
    _caption_numeral,
)
_PREFIXES = ("a picture of ", "an image showing ", "a drawing of ", "a render of ")


def make_captions(scene: Scene, rng: np.random.Generator, n: int = NUM_CAPTIONS) -> list[str]:
    """`n` distinct captions from randomly ordered templates.

    Scenes with a single object have fewer applicable templates; prefixed variants of the list
    caption fill up the remaining slots so that every image has exactly `n` captions.
    """
    captions: list[str] = []
    for index in rng.permutation(len(_TEMPLATES)):
        text = _TEMPLATES[index](scene, rng)
        if text is not None and text not in captions:
            captions.append(text)
    for prefix in _PREFIXES:
        captions.append(prefix + _caption_list(scene, rng))
    unique = list(dict.fromkeys(captions))
    return unique[:n]


def make_example(name: str, split: str, index: int) -> dict:
    """One `scenes` example, a pure function of (dataset name, split, index)."""
    rng = render.example_rng(name, split, index)
    scene = render.sample_scene(rng)
    image = render.render_scene(scene, rng)
    image_id = render.image_id(split, index)
    captions = make_captions(scene, rng)
    return {
        "image": render.encode_jpeg(image),
        "image/id": image_id,
        "image/filename": f"{split}_{index:06d}.jpg",
        "captions": {
            "id": [image_id * 10 + k for k in range(len(captions))],
            "text": captions,
        },
        "label": label_index(scene.main.shape, scene.main.color),
        "shape": scene.main.shape,
        "color": scene.main.color,
        "count": len(scene.objects) - 1,
        "objects": render.encode_objects(scene),
    }


class Scenes(render.LocalBuilder):
    """Rendered shape scenes with captions; generated locally, no download."""

    def _info(self) -> tfds.core.DatasetInfo:
        size = (render.IMAGE_SIZE, render.IMAGE_SIZE, 3)
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=size, encoding_format="jpeg"),
                "image/id": np.int64,
                "image/filename": tfds.features.Text(),
                "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
                "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                "shape": tfds.features.ClassLabel(names=render.SHAPES),
                "color": tfds.features.ClassLabel(names=render.COLOR_NAMES),
                "count": tfds.features.ClassLabel(names=COUNT_NAMES),
                "objects": render.objects_feature(),
            }
        )
        return self.dataset_info_from_configs(
            description=__doc__,
            features=features,
            supervised_keys=("image", "label"),
        )

    def make_example(self, split: str, index: int) -> dict:
        return make_example(self.name, split, index)

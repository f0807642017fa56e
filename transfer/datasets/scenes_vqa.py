"""`scenes_vqa`: questions about rendered shape scenes, with 10 answers each (VQAv2 layout).

Scenes are drawn like `scenes` (one large object, 0-3 small ones, 64x64). Each example asks one
question from eight templates (counting, existence, colour, shape, size, position) and carries
ten simulated annotator answers: the canonical answer at least six times, so it is always the
majority, plus realistic disagreement (synonyms like "two" for "2" or "ball" for "circle", and
plausible mistakes like a neighbouring count or colour). `objects` gives the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from transfer.datasets import render
from transfer.datasets.render import Scene, SceneObject, pick
from transfer.datasets.scenes import NUMBER_WORDS, WHERE, article, plural

NUM_ANSWERS = 10
ANSWER_TYPES = ("yes/no", "number", "other")

# Alternative spellings an annotator may give for a correct answer.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("ball", "round"),
    "square": ("box", "rectangle"),
    "triangle": ("pyramid",),
    "star": ("stars",),
    "cross": ("plus", "plus sign"),
    "diamond": ("rhombus",),
    "large": ("big",),
    "small": ("little", "tiny"),
    "center": ("middle",),
    "left": ("on left",),
    "right": ("on right",),
    "top": ("up",),
    "bottom": ("down",),
}
# Plausible wrong answers: what a careless annotator might confuse the answer with.
_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "pink"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "green"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("blue", "pink"),
    "pink": ("purple", "red"),
    "circle": ("square",),
    "square": ("diamond", "circle"),
    "triangle": ("diamond",),
    "star": ("cross",),
    "cross": ("star",),
    "diamond": ("square", "triangle"),
    "large": ("small",),
    "small": ("large",),
    "yes": ("no",),
    "no": ("yes",),
    "left": ("center",),
    "right": ("center",),
    "top": ("center",),
    "bottom": ("center",),
    "center": ("top", "bottom"),
}

Question = tuple[str, str, str, str]  # (question, canonical answer, answer type, question type)


def _count_all(scene: Scene, rng: np.random.Generator) -> Question:
    return "how many shapes are there?", str(len(scene.objects)), "number", "how many"


def _count_color(scene: Scene, rng: np.random.Generator) -> Question:
    """Half of the time about a colour that is present, otherwise any colour (answer may be 0)."""
    if rng.uniform() < 0.5:
        color = pick(rng, scene.objects).color
    else:
        color = pick(rng, render.COLOR_NAMES)
    n = sum(o.color == color for o in scene.objects)
    return f"how many {color} shapes are there?", str(n), "number", "how many"


def _count_shape(scene: Scene, rng: np.random.Generator) -> Question:
    if rng.uniform() < 0.5:
        shape = pick(rng, scene.objects).shape
    else:
        shape = pick(rng, render.SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    return f"how many {plural(shape)} are there?", str(n), "number", "how many"


def _exists(scene: Scene, rng: np.random.Generator) -> Question:
    """Balanced yes/no: a present (colour, shape) pair or a random absent one."""
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.uniform() < 0.5:
        obj = pick(rng, scene.objects)
        color, shape = obj.color, obj.shape
    else:
        absent = [
            (c, s) for c in render.COLOR_NAMES for s in render.SHAPES if (c, s) not in present
        ]
        color, shape = pick(rng, absent)
    answer = "yes" if (color, shape) in present else "no"
    return f"is there {article(color)} {shape}?", answer, "yes/no", "is there a"


def _unique(scene: Scene, key: Callable[[SceneObject], tuple]) -> list[SceneObject]:
    """Objects that no other object matches on `key`, so a question about them is unambiguous."""
    keys = [key(o) for o in scene.objects]
    return [o for o, k in zip(scene.objects, keys, strict=True) if keys.count(k) == 1]


def _color_of(scene: Scene, rng: np.random.Generator) -> Question:
    candidates = _unique(scene, lambda o: (o.shape,))
    if not candidates:
        return "what color is the large shape?", scene.main.color, "other", "what color is the"
    obj = pick(rng, candidates)
    return f"what color is the {obj.shape}?", obj.color, "other", "what color is the"


def _shape_at(scene: Scene, rng: np.random.Generator) -> Question:
    obj = pick(rng, scene.objects)
    return f"what shape is {WHERE[obj.position]}?", obj.shape, "other", "what shape is"


def _size_of(scene: Scene, rng: np.random.Generator) -> Question:
    """If the (colour, shape) pair repeats, the slot disambiguates: 'the red star at the top'."""
    candidates = _unique(scene, lambda o: (o.color, o.shape))
    obj = pick(rng, candidates or scene.objects)
    where = "" if candidates else " " + WHERE[obj.position]
    return (
        f"what size is the {obj.color} {obj.shape}{where}?",
        obj.size,
        "other",
        "what size is the",
    )


def _where(scene: Scene, rng: np.random.Generator) -> Question:
    """If the (colour, shape) pair repeats, the size disambiguates: 'the large red star'."""
    candidates = _unique(scene, lambda o: (o.color, o.shape))
    obj = pick(rng, candidates or [scene.main])
    size = "" if candidates else "large "
    return f"where is the {size}{obj.color} {obj.shape}?", obj.position, "other", "where is the"


_QUESTIONS = (
    _count_all,
    _count_color,
    _count_shape,
    _exists,
    _color_of,
    _shape_at,
    _size_of,
    _where,
)


def _disagreement(answer: str, answer_type: str, rng: np.random.Generator) -> str:
    """One non-canonical answer: a synonym of the right answer or a plausible mistake."""
    if answer_type == "number":
        n = int(answer)
        if rng.uniform() < 0.5 and n in NUMBER_WORDS:
            return NUMBER_WORDS[n]
        return str(max(0, n + (1 if n == 0 or rng.uniform() < 0.5 else -1)))
    synonyms = _SYNONYMS.get(answer, ())
    if synonyms and rng.uniform() < 0.5:
        return pick(rng, synonyms)
    return pick(rng, _CONFUSIONS[answer])


def simulate_answers(answer: str, answer_type: str, rng: np.random.Generator) -> list[str]:
    """Ten answers; 0-4 of them disagree, so the canonical answer is always the majority."""
    n_other = int(rng.choice(5, p=[0.35, 0.3, 0.2, 0.1, 0.05]))
    answers = [answer] * (NUM_ANSWERS - n_other)
    answers += [_disagreement(answer, answer_type, rng) for _ in range(n_other)]
    return [answers[i] for i in rng.permutation(NUM_ANSWERS)]


def make_example(name: str, split: str, index: int) -> dict:
    """One `scenes_vqa` example, a pure function of (dataset name, split, index)."""
    rng = render.example_rng(name, split, index)
    scene = render.sample_scene(rng)
    image = render.render_scene(scene, rng)
    question, answer, answer_type, question_type = pick(rng, _QUESTIONS)(scene, rng)
    image_id = render.image_id(split, index)
    return {
        "image": render.encode_jpeg(image),
        "image/id": image_id,
        "question": question,
        "question_id": image_id,
        "answers": simulate_answers(answer, answer_type, rng),
        "answer_type": answer_type,
        "question_type": question_type,
        "objects": render.encode_objects(scene),
    }


class ScenesVqa(render.LocalBuilder):
    """Visual questions about rendered shape scenes; generated locally, no download."""

    def _info(self) -> tfds.core.DatasetInfo:
        size = (render.IMAGE_SIZE, render.IMAGE_SIZE, 3)
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=size, encoding_format="jpeg"),
                "image/id": np.int64,
                "question": tfds.features.Text(),
                "question_id": np.int64,
                "answers": tfds.features.Sequence(tfds.features.Text(), length=NUM_ANSWERS),
                "answer_type": tfds.features.Text(),
                "question_type": tfds.features.Text(),
                "objects": render.objects_feature(),
            }
        )
        return self.dataset_info_from_configs(description=__doc__, features=features)

    def make_example(self, split: str, index: int) -> dict:
        return make_example(self.name, split, index)

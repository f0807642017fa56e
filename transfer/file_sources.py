"""The files people already have (official COCO captions, VQAv2 and TextVQA json + image folders) as input sources.

`input.data.name` = "coco_files" | "vqav2_files" | "textvqa_files", with the paths in `annotations`, `images`,
`karpathy` (COCO) and `questions` (VQAv2); docs/data_files.md lists the layouts, keys and splits. Examples carry the
feature keys of TFDS `coco_captions` and of big_vision's `vqa` / `textvqa` builders, so the same pp strings and
evaluator keys work. `{split}` in a path is replaced by the split part's name.

Slicing and hosts work as for img2dataset shards (transfer/shards.py): each "+"-joined split part is sliced like
TFDS, the parts are concatenated in order, and that sequence is cut into near-equal contiguous host slices. A raw
example holds the image's PATH; `fetch` reads the file inside the pp map, after the stream's shuffle and skip, so a
resume skips without reading images, a pp that drops `image` reads none, and a missing or unreadable image drops its
example, counted in `input/skipped` like a corrupt one. The jsons are parsed once per process; a missing file or a
json of another layout fails at start-up, saying what was expected.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from transfer import shards
from transfer.config import MissingFileError

_COMMON = ("name", "split", "data_dir")
_PART = re.compile(r"^([\w\-]+)(\[.*\])?$")
_SLICE = re.compile(r"^\[(-?\d+%?)?:(-?\d+%?)?\]$")
_COCO_FILE = re.compile(r"^captions_(\w+)\.json$")
# column -> np.ndarray (one value per example) or (values, offsets) for lists of values
Table = dict[str, Any]


# ----------------------------------------------------------------------------- reading the jsons


def _load(path: str, what: str, key: str) -> Any:
    """The parsed json at `path`, or a one-line error saying what was expected there."""
    if not tf.io.gfile.exists(path):
        raise MissingFileError(f"input.data.{key}: {path!r} does not exist (expected {what}).")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"input.data.{key}: {path!r} is not JSON ({e}); expected {what}."
        ) from None


def _records(data: Any, path: str, what: str, list_key: str, fields: Sequence[str]) -> list[dict]:
    """`data[list_key]`: a list of dicts that all hold `fields`, else an error showing the expected layout."""
    layout = f"{{{list_key!r}: [{{{', '.join(map(repr, fields))}, ...}}, ...]}}"
    records = data.get(list_key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        found = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path!r} is not {what}: expected {layout}, found top-level {found}.")
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record] if isinstance(record, dict) else fields
        if missing:
            raise ValueError(
                f"{path!r} is not {what}: {list_key}[{i}] lacks {list(missing)} (expected {layout})."
            )
    return records


def _ragged(lists: Sequence[Sequence[Any]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list of lists: row i is values[offsets[i]:offsets[i + 1]]."""
    flat = [v for row in lists for v in row]
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in lists], dtype=np.int64)])
    return np.array(flat, dtype=dtype).reshape(-1), offsets.astype(np.int64)


def _texts(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=object).reshape(-1)


# ----------------------------------------------------------------------------- COCO captions

_COCO = "an official COCO captions file (annotations/captions_<folder>.json)"
_KARPATHY = "Karpathy's COCO split file dataset_coco.json"


@functools.cache
def _coco_images(paths: tuple[str, ...], images: str) -> dict[str, list[tuple]]:
    """{folder: [(image id, path, file name, caption ids, captions)]} in each file's order."""
    out: dict[str, list[tuple]] = {}
    seen: dict[int, str] = {}
    for path in paths:
        match = _COCO_FILE.match(posixpath.basename(path))
        if not match:
            raise ValueError(
                f"input.data.annotations: cannot tell the image folder of {path!r}: the official files "
                "are named captions_<folder>.json (captions_train2014.json: images in <images>/train2014/)."
            )
        folder = match.group(1)
        data = _load(path, _COCO, "annotations")
        rows = _records(data, path, _COCO, "images", ("id", "file_name"))
        anns = _records(data, path, _COCO, "annotations", ("id", "image_id", "caption"))
        captions: dict[int, list[tuple[int, str]]] = {int(r["id"]): [] for r in rows}
        for ann in anns:
            captions.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), ann["caption"]))
        for row in rows:
            image_id = int(row["id"])
            if image_id in seen:
                raise ValueError(
                    f"input.data.annotations: image {image_id} is in both {seen[image_id]!r} and "
                    f"{path!r}: give the captions files of one COCO release (2014 or 2017)."
                )
            seen[image_id] = path
            file_path = os.path.join(images, folder, row["file_name"])
            ids, texts = zip(*captions[image_id], strict=True) if captions[image_id] else ((), ())
            out.setdefault(folder, []).append((image_id, file_path, row["file_name"], ids, texts))
    return out


@functools.cache
def _karpathy_splits(path: str) -> dict[str, list[int]]:
    """{split: [cocoid, ...]} in the file's order."""
    data = _load(path, _KARPATHY, "karpathy")
    rows = _records(data, path, _KARPATHY, "images", ("split", "cocoid", "filename", "sentences"))
    out: dict[str, list[int]] = {}
    for row in rows:
        out.setdefault(str(row["split"]), []).append(int(row["cocoid"]))
    return out


@functools.cache
def _coco_table(paths: tuple[str, ...], images: str, karpathy: str | None, part: str) -> Table:
    by_folder = _coco_images(paths, images)
    if not karpathy:
        if part not in by_folder:
            raise ValueError(
                f"coco_files without input.data.karpathy has the official splits {sorted(by_folder)} "
                f"(named by the captions files' folders); got split {part!r}."
            )
        rows = by_folder[part]
    else:
        splits = _karpathy_splits(karpathy)
        if part not in splits:
            raise ValueError(f"{karpathy!r} has the splits {sorted(splits)}; got split {part!r}.")
        by_id = {row[0]: row for folder in by_folder.values() for row in folder}
        missing = [i for i in splits[part] if i not in by_id]
        if missing:
            raise ValueError(
                f"{len(missing)} images of Karpathy split {part!r} (e.g. id {missing[0]}) are in none of "
                f"input.data.annotations {list(paths)}: give captions_train2014.json and captions_val2014.json."
            )
        rows = [by_id[i] for i in splits[part]]
    ids, files, names, caption_ids, captions = zip(*rows, strict=True) if rows else ((),) * 5
    return {
        "image/id": np.array(ids, np.int64).reshape(-1),
        "image_path": _texts(files),
        "image/filename": _texts(names),
        "captions/id": _ragged(caption_ids, np.int64),
        "captions/text": _ragged(captions, object),
    }


# ----------------------------------------------------------------------------- VQAv2 and TextVQA

_QUESTIONS = "an official VQAv2 questions file (v2_OpenEnded_mscoco_<split>_questions.json)"
_ANSWERS = "an official VQAv2 annotations file (v2_mscoco_<split>_annotations.json)"
_TEXTVQA = "an official TextVQA file (TextVQA_0.5.1_<split>.json)"


@functools.cache
def _vqav2_table(questions: str, annotations: str, images: str, part: str) -> Table:
    qs = _records(
        _load(questions, _QUESTIONS, "questions"),
        questions,
        _QUESTIONS,
        "questions",
        ("question_id", "image_id", "question"),
    )
    fields = ("question_id", "answers", "multiple_choice_answer", "answer_type", "question_type")
    anns = _records(
        _load(annotations, _ANSWERS, "annotations"), annotations, _ANSWERS, "annotations", fields
    )
    by_qid = {int(a["question_id"]): a for a in anns}
    missing = [q["question_id"] for q in qs if int(q["question_id"]) not in by_qid]
    if missing:
        raise ValueError(
            f"{len(missing)} questions of {questions!r} (e.g. id {missing[0]}) have no annotation in "
            f"{annotations!r}: give the annotations file of the same split."
        )
    answers, confidences = [], []
    for q in qs:
        given = by_qid[int(q["question_id"])]["answers"]
        if not isinstance(given, list) or not all(
            isinstance(a, dict) and "answer" in a for a in given
        ):
            raise ValueError(
                f"{annotations!r} is not {_ANSWERS}: the answers of question {q['question_id']} must be "
                "[{'answer', 'answer_confidence', 'answer_id'}, ...]."
            )
        answers.append([a["answer"] for a in given])
        confidences.append([a.get("answer_confidence", "") for a in given])
    names = [f"COCO_{part}_{int(q['image_id']):012d}.jpg" for q in qs]
    ann = [by_qid[int(q["question_id"])] for q in qs]
    return {
        "image/id": np.array([int(q["image_id"]) for q in qs], np.int64),
        "image_path": _texts(os.path.join(images, n) for n in names),
        "image/filename": _texts(names),
        "question_id": np.array([int(q["question_id"]) for q in qs], np.int64),
        "question_text": _texts(q["question"] for q in qs),
        "question_type": _texts(a["question_type"] for a in ann),
        "answer_type": _texts(a["answer_type"] for a in ann),
        "answers": _ragged(answers, object),
        "answer_confidences": _ragged(confidences, object),
        "top_answer": _texts(a["multiple_choice_answer"] for a in ann),
    }


@functools.cache
def _textvqa_table(path: str, images: str) -> Table:
    fields = ("question", "question_id", "image_id")
    rows = _records(_load(path, _TEXTVQA, "annotations"), path, _TEXTVQA, "data", fields)
    for row in rows:
        if not isinstance(row.get("answers", []), list):
            raise ValueError(
                f"{path!r} is not {_TEXTVQA}: answers of question {row['question_id']} not a list."
            )
    return {
        "image/id": _texts(str(r["image_id"]) for r in rows),
        "image_path": _texts(os.path.join(images, f"{r['image_id']}.jpg") for r in rows),
        "question_id": np.array([int(r["question_id"]) for r in rows], np.int64),
        "question": _texts(r["question"] for r in rows),
        "answers": _ragged([[str(a) for a in r.get("answers", [])] for r in rows], object),
        "image_classes": _ragged(
            [[str(c) for c in r.get("image_classes", [])] for r in rows], object
        ),
    }


# ----------------------------------------------------------------------------- the sources


def _rows(table: Table) -> int:
    column = next(iter(table.values()))
    return len(column[1]) - 1 if isinstance(column, tuple) else len(column)


def _take(tables: Sequence[tuple[Table, int, int]], key: str) -> tf.Tensor | tf.RaggedTensor:
    """Column `key` of rows [lo, hi) of each table, concatenated."""
    first = tables[0][0][key]
    if not isinstance(first, tuple):
        values = np.concatenate([t[key][lo:hi] for t, lo, hi in tables])
        return tf.constant(values, tf.string if values.dtype == object else tf.int64)
    values = np.concatenate([t[key][0][t[key][1][lo] : t[key][1][hi]] for t, lo, hi in tables])
    lengths = np.concatenate([np.diff(t[key][1][lo : hi + 1]) for t, lo, hi in tables])
    dtype = tf.string if first[0].dtype == object else tf.int64
    return tf.RaggedTensor.from_row_lengths(
        tf.constant(values, dtype), tf.constant(lengths, tf.int64)
    )


class FileSource:
    """One `input.data` config of official files: the jsons, splits and first images are checked at construction."""

    NAME = ""
    KEYS: tuple[str, ...] = ()
    REQUIRED: tuple[str, ...] = ()
    NESTED: tuple[str, ...] = ()  # "a/b" columns that are nested features (TFDS Sequence of dicts)
    IMAGES = ""  # what input.data.images must hold, for the error message

    def __init__(self, data_cfg: Mapping[str, Any]):
        valid = self.KEYS + _COMMON
        for key in data_cfg:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"Unknown input.data key {key!r} for {self.NAME}.{hint} Valid: {valid}"
                )
        for key in self.REQUIRED:
            if not data_cfg.get(key):
                raise ValueError(
                    f"{self.NAME} needs input.data.{key} (see transfer/file_sources.py)."
                )
        self.cfg = {k: data_cfg.get(k) for k in self.KEYS}
        split = str(data_cfg.get("split", "train")).replace(" ", "")
        self.tables, self.ranges = [], []
        for text in split.split("+"):
            match = _PART.match(text)
            if not match or (match.group(2) and not _SLICE.match(match.group(2))):
                raise ValueError(
                    f"{self.NAME}: cannot read split {split!r}: use split names joined by '+', each "
                    "optionally sliced like TFDS ('train', 'val[:1000]', 'train[:95%]+restval')."
                )
            self.tables.append(self.table(match.group(1)))
            self.ranges.append(
                shards.split_range(f"train{match.group(2) or ''}", _rows(self.tables[-1]))
            )
            self._check_image(self.tables[-1], match.group(1))
        self.total = sum(len(r) for r in self.ranges)

    def path(self, key: str, part: str) -> str:
        return str(self.cfg[key]).replace("{split}", part)

    def table(self, part: str) -> Table:
        raise NotImplementedError

    def _check_image(self, table: Table, part: str) -> None:
        """The first image of a part must exist: a wrong image root fails here, not as skipped examples."""
        if _rows(table) and not tf.io.gfile.exists(table["image_path"][0]):
            raise MissingFileError(
                f"{self.NAME}: no image {table['image_path'][0]!r} for the first example of split {part!r}; "
                f"set input.data.images ({self.IMAGES})."
            )

    def _host(self, index: int, count: int) -> range:
        if not 0 <= index < count:
            raise ValueError(f"process_index {index} not in [0, {count})")
        return shards.host_range(range(self.total), index, count)

    def num_examples(self, index: int = 0, count: int = 1) -> int:
        """Examples in host `index`'s slice (those with a missing image included)."""
        return len(self._host(index, count))

    def pieces(self, index: int = 0, count: int = 1) -> list[tuple[Table, int, int]]:
        """(table, first row, end row) covering the host slice, in order."""
        wanted, out, first = self._host(index, count), [], 0
        for table, rows in zip(self.tables, self.ranges, strict=True):
            lo, hi = max(wanted.start, first), min(wanted.stop, first + len(rows))
            if lo < hi:
                out.append((table, rows[lo - first], rows[hi - first - 1] + 1))
            first += len(rows)
        return out or [(self.tables[0], 0, 0)]

    def dataset(self, index: int = 0, count: int = 1) -> tf.data.Dataset:
        """The host slice's raw examples (image PATHS, see `fetch`) in index order."""
        pieces = self.pieces(index, count)
        columns = {key: _take(pieces, key) for key in self.tables[0]}

        def structure(flat: dict[str, tf.Tensor]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in flat.items():
                outer, _, inner = key.partition("/")
                if outer in self.NESTED:
                    out.setdefault(outer, {})[inner] = value
                else:
                    out[key] = tf.identity(value)  # A ragged row becomes a plain tensor.
            return out

        return tf.data.Dataset.from_tensor_slices(columns).map(structure)

    @staticmethod
    def fetch(example: dict[str, Any]) -> dict[str, Any]:
        """Reads the image file (the pipeline calls this inside its pp map, see the module docstring)."""
        example = dict(example)
        example["image"] = tf.io.read_file(example.pop("image_path"))
        return example


class CocoCaptions(FileSource):
    """Official COCO captions files + image folders, Karpathy splits."""

    NAME, NESTED = "coco_files", ("captions",)
    KEYS, REQUIRED = ("annotations", "images", "karpathy"), ("annotations", "images")
    IMAGES = "the folder holding train2014/ and val2014/"

    def table(self, part: str) -> Table:
        given = self.cfg["annotations"]
        paths: list[str] = []
        for pattern in filter(
            None, (p.strip() for p in (given.split(",") if isinstance(given, str) else given))
        ):
            found = (
                sorted(tf.io.gfile.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            )
            if not found:
                raise MissingFileError(
                    f"input.data.annotations: {pattern!r} matches no file (expected {_COCO})."
                )
            paths += [p for p in found if p not in paths]
        return _coco_table(
            tuple(paths), str(self.cfg["images"]), self.cfg["karpathy"] or None, part
        )


class VqaV2(FileSource):
    """Official VQAv2 questions + annotations files + COCO 2014 image folders."""

    NAME, KEYS = "vqav2_files", ("questions", "annotations", "images")
    REQUIRED = KEYS
    IMAGES = "the split's COCO folder, e.g. coco/{split} for coco/train2014/COCO_train2014_*.jpg"

    def table(self, part: str) -> Table:
        return _vqav2_table(*(self.path(k, part) for k in self.KEYS), part)


class TextVqa(FileSource):
    """Official TextVQA json + its image folder."""

    NAME, KEYS = "textvqa_files", ("annotations", "images")
    REQUIRED = KEYS
    IMAGES = "the folder of <image_id>.jpg: train_images/ for train and val"

    def table(self, part: str) -> Table:
        return _textvqa_table(self.path("annotations", part), self.path("images", part))


SOURCES = {s.NAME: s for s in (CocoCaptions, VqaV2, TextVqa)}


def is_files(data_cfg: Mapping[str, Any]) -> bool:
    """True when `data_cfg` names one of the official-file sources."""
    return data_cfg.get("name") in SOURCES


def get_source(data_cfg: Mapping[str, Any]) -> FileSource:
    """The source of `data_cfg.name`, checked (files, layouts, split, first images)."""
    return SOURCES[data_cfg["name"]](data_cfg)

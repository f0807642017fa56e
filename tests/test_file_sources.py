"""Official COCO captions / VQAv2 / TextVQA files as input sources, against small files written field by field in the
official layouts (real JPEGs): values, splits, host slices, exact resume, errors, and 2-step runs of the configs."""

import io
import itertools
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from transfer import config as config_lib
from transfer import file_sources, metrics, train
from transfer import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN2014, VAL2014 = [9, 25, 30, 34], [42, 73, 74, 133, 136, 139]
# dataset_coco.json's order (the split order): image 30 is in no split, 136 has no image file.
KARPATHY = [(133, "test"), (25, "train"), (42, "val"), (9, "train"), (73, "restval"), (136, "test"),
            (34, "train"), (74, "val"), (139, "test")]  # fmt: skip
NO_FILE = 136
WORDS = "a red blue green cat dog sits on the mat near small big old tree car road".split()
TEXTVQA = {
    "train": [("0054c91397f2fe05", 0), ("0054c91397f2fe05", 1), ("00685bc495504d61", 2)],
    "val": [("00685bc495504d61", 34602), ("003a8ae2ef43b901", 34603)],
    "test": [("0a0bc91825468c45", 37704)],
}


def _jpeg(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def _caption(i, k):
    rng = np.random.default_rng(i * 10 + k)
    return " ".join(rng.choice(WORDS, 5)).capitalize() + "."


def _captions(i):
    """(annotation id, caption) of image i: 5, or 6 for image 34 (as some COCO images have)."""
    return [(i * 100 + k, _caption(i, k)) for k in range(6 if i == 34 else 5)]


def _answers(qid):
    return [WORDS[(qid + k // 4) % len(WORDS)] for k in range(10)]


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _write_coco(root):
    for folder, ids in (("train2014", TRAIN2014), ("val2014", VAL2014)):
        os.makedirs(f"{root}/coco/{folder}")
        for i in ids:
            if i != NO_FILE:
                with open(f"{root}/coco/{folder}/COCO_{folder}_{i:012d}.jpg", "wb") as f:
                    f.write(_jpeg(i))
        images = [
            dict(
                license=3,
                file_name=f"COCO_{folder}_{i:012d}.jpg",
                height=16,
                width=16,
                id=i,
                coco_url=f"http://images.example.org/{folder}/COCO_{folder}_{i:012d}.jpg",
                date_captured="2013-11-14 11:18:45",
                flickr_url=f"http://farm.example.com/{i}.jpg",
            )
            for i in ids
        ]
        # Annotations interleave images, as in the official files.
        anns = [
            dict(image_id=i, id=cid, caption=text)
            for k in range(6)
            for i in ids
            for cid, text in _captions(i)[k : k + 1]
        ]
        _dump(
            f"{root}/coco/annotations/captions_{folder}.json",
            dict(
                info=dict(description="COCO 2014 Dataset", version="1.0", year=2014),
                licenses=[
                    dict(
                        url="http://creativecommons.org/licenses/by/2.0/", id=3, name="Attribution"
                    )
                ],
                images=images,
                annotations=anns,
            ),
        )
    karpathy = []
    for imgid, (i, split) in enumerate(KARPATHY):
        folder = "train2014" if i in TRAIN2014 else "val2014"
        sentences = [
            dict(tokens=t.lower().strip(".").split(), raw=t, imgid=imgid, sentid=c)
            for c, t in _captions(i)
        ]
        karpathy.append(
            dict(
                filepath=folder,
                sentids=[s["sentid"] for s in sentences],
                filename=f"COCO_{folder}_{i:012d}.jpg",
                imgid=imgid,
                split=split,
                sentences=sentences,
                cocoid=i,
            )
        )
    _dump(f"{root}/coco/dataset_coco.json", dict(images=karpathy, dataset="coco"))


def _write_vqav2(root):
    for split, ids in (("train2014", [9, 25]), ("val2014", [42, 73])):
        questions = [
            dict(image_id=i, question=f"what is {WORDS[k]} {i}?", question_id=i * 1000 + k)
            for i in ids
            for k in range(2)
        ]
        anns = [
            dict(
                question_type="what is",
                multiple_choice_answer=_answers(q["question_id"])[0],
                answers=[
                    dict(answer=a, answer_confidence=("yes", "maybe", "no")[k % 3], answer_id=k + 1)
                    for k, a in enumerate(_answers(q["question_id"]))
                ],
                image_id=q["image_id"],
                answer_type="other",
                question_id=q["question_id"],
            )
            for q in reversed(questions)  # Matched by question_id, not by position.
        ]
        head = dict(info=dict(description="VQA v2"), license=dict(name="CC"), data_subtype=split)
        _dump(
            f"{root}/vqav2/v2_OpenEnded_mscoco_{split}_questions.json",
            dict(head, task_type="Open-Ended", data_type="mscoco", questions=questions),
        )
        _dump(
            f"{root}/vqav2/v2_mscoco_{split}_annotations.json",
            dict(head, data_type="mscoco", annotations=anns),
        )


def _write_textvqa(root):
    for split, rows in TEXTVQA.items():
        folder = "test_images" if split == "test" else "train_images"
        data = []
        for image_id, qid in rows:
            os.makedirs(f"{root}/textvqa/{folder}", exist_ok=True)
            with open(f"{root}/textvqa/{folder}/{image_id}.jpg", "wb") as f:
                f.write(_jpeg(int(image_id[:6], 16)))
            row = dict(
                question=f"what does sign {qid} say?",
                image_id=image_id,
                image_classes=["Street sign", "Car"],
                flickr_original_url="https://farm.example.com/a.jpg",
                flickr_300k_url="https://farm.example.com/b.jpg",
                image_width=16,
                image_height=16,
                question_tokens=["what", "does", "sign", str(qid), "say"],
                question_id=qid,
                set_name=split,
            )
            if split != "test":  # The test file has no answers.
                row["answers"] = _answers(qid)
            data.append(row)
        _dump(
            f"{root}/textvqa/TextVQA_0.5.1_{split}.json",
            dict(dataset_type=split, dataset_name="textvqa", dataset_version="0.5.1", data=data),
        )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("official"))
    _write_coco(path)
    _write_vqav2(path)
    _write_textvqa(path)
    return path


def coco(root, split="train", **kw):
    return (
        dict(
            name="coco_files",
            split=split,
            images=f"{root}/coco",
            karpathy=f"{root}/coco/dataset_coco.json",
            annotations=f"{root}/coco/annotations/captions_*2014.json",
        )
        | kw
    )


def vqav2(root, split="train2014", **kw):
    return (
        dict(
            name="vqav2_files",
            split=split,
            images=f"{root}/coco/{{split}}",
            questions=f"{root}/vqav2/v2_OpenEnded_mscoco_{{split}}_questions.json",
            annotations=f"{root}/vqav2/v2_mscoco_{{split}}_annotations.json",
        )
        | kw
    )


def textvqa(root, split="train", **kw):
    return (
        dict(
            name="textvqa_files",
            split=split,
            images=f"{root}/textvqa/train_images",
            annotations=f"{root}/textvqa/TextVQA_0.5.1_{{split}}.json",
        )
        | kw
    )


def _raw(data, index=0, count=1):
    """The raw examples with their images read (as the pipeline's fetch does), skipping none."""
    source = ip.get_builder(data)
    ds = source.dataset(index, count).map(source.fetch).ignore_errors()
    return list(ds.as_numpy_iterator())


def _ids(data, index=0, count=1):
    source = ip.get_builder(data)
    return [int(ex["image/id"]) for ex in source.dataset(index, count).as_numpy_iterator()]


def test_coco_examples_are_the_files_captions_in_karpathy_splits(root):
    for split in ("train", "restval", "val", "test"):
        expected = [i for i, s in KARPATHY if s == split]
        examples = _raw(coco(root, split))
        assert [int(ex["image/id"]) for ex in examples] == [i for i in expected if i != NO_FILE]
        for ex in examples:
            i = int(ex["image/id"])
            folder = "train2014" if i in TRAIN2014 else "val2014"
            assert ex["image/filename"].decode() == f"COCO_{folder}_{i:012d}.jpg"
            assert ex["image"] == _jpeg(i)
            captions = zip(ex["captions"]["id"], ex["captions"]["text"], strict=True)
            assert [(int(c), t.decode()) for c, t in captions] == _captions(i)
        # The example without an image file is counted (the pipeline skips it when it reads the file).
        assert ip.num_examples(coco(root, split), 0, 1) == len(expected)
    assert _ids(coco(root, "train+restval")) == [25, 9, 34, 73]
    assert _ids(coco(root, "test[1:]+val[:50%]")) == [136, 139, 42]
    # Without Karpathy's file: the official splits, named by folder.
    assert _ids(coco(root, "val2014[-2:]", karpathy=None)) == VAL2014[-2:]
    assert _ids(coco(root, "train2014", karpathy="")) == TRAIN2014


def test_vqav2_examples_follow_questions_and_annotations(root):
    for split, ids in (("train2014", [9, 25]), ("val2014", [42, 73])):
        examples = _raw(vqav2(root, split))
        assert [int(ex["question_id"]) for ex in examples] == [
            i * 1000 + k for i in ids for k in range(2)
        ]
        for ex in examples:
            qid, i = int(ex["question_id"]), int(ex["image/id"])
            assert ex["question_text"].decode() == f"what is {WORDS[qid % 1000]} {i}?"
            assert [a.decode() for a in ex["answers"]] == _answers(qid)
            assert ex["top_answer"].decode() == _answers(qid)[0]
            assert [c.decode() for c in ex["answer_confidences"]][:3] == ["yes", "maybe", "no"]
            assert (ex["answer_type"], ex["question_type"]) == (b"other", b"what is")
            assert ex["image/filename"].decode() == f"COCO_{split}_{i:012d}.jpg" and ex[
                "image"
            ] == _jpeg(i)


def test_textvqa_examples_and_a_test_file_without_answers(root):
    for split in ("train", "val"):
        examples = _raw(textvqa(root, split))
        assert [(ex["image/id"].decode(), int(ex["question_id"])) for ex in examples] == TEXTVQA[
            split
        ]
        for ex in examples:
            qid = int(ex["question_id"])
            assert ex["question"].decode() == f"what does sign {qid} say?"
            assert [a.decode() for a in ex["answers"]] == _answers(qid)
            assert list(ex["image_classes"]) == [b"Street sign", b"Car"]
            assert ex["image"] == _jpeg(int(ex["image/id"][:6], 16))
    (test,) = _raw(textvqa(root, "test", images=f"{root}/textvqa/test_images"))
    assert test["answers"].shape == (0,) and int(test["question_id"]) == 37704


@pytest.mark.parametrize("count", [2, 3, 4])
def test_hosts_get_contiguous_slices_that_cover_everything(root, count):
    data = coco(root, "train+restval+val+test")
    parts = [_ids(data, i, count) for i in range(count)]
    sizes = [ip.num_examples(data, i, count) for i in range(count)]
    assert [len(p) for p in parts] == sizes and max(sizes) - min(sizes) <= 1
    assert list(itertools.chain(*parts)) == _ids(data) == [25, 9, 34, 73, 42, 74, 133, 136, 139]


def _train(data, shuffle_buffer_size=4, **kw):
    cfg = dict(
        data=data,
        pp="decode|random_crop(8)|flip_lr|flatten|choice('captions/text')"
        "|keep('image', 'image/id', 'captions/text')",
        batch_size=2,
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return ip.TrainIterator(cfg, process_index=0, process_count=1, **kw)


def test_resume_is_exact_and_a_missing_image_is_skipped_and_counted(root):
    data = coco(root, "train+restval+val+test")
    in_order = _train(data, seed=5, shuffle_buffer_size=0)
    batches = list(itertools.islice(in_order, 4))  # One epoch: 8 of 9 (136 has no file).
    assert [int(i) for b in batches for i in b["image/id"]] == [25, 9, 34, 73, 42, 74, 133, 139]
    assert (in_order.position, in_order.stats()["input/skipped"]) == (9, 1)
    original = _train(data, seed=5)
    list(itertools.islice(original, 5))  # In epoch 2.
    position, skipped = original.position, original.stats()["input/skipped"]
    expected = list(itertools.islice(original, 4))
    resumed = _train(data, seed=5, start_position=position, start_skipped=skipped)
    for a, b in zip(itertools.islice(resumed, 4), expected, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (resumed.position, resumed.stats()) == (original.position, original.stats())


def test_eval_pass_and_a_text_only_pp_reads_no_image(root):
    def ids(pp):
        batches = ip.eval_batches(
            dict(data=coco(root, "test"), pp=pp), batch_size=2, process_index=0, process_count=1
        )
        return [
            int(i) for b in batches for i, m in zip(b["image/id"], b["_mask"], strict=True) if m
        ], batches

    with_images, batches = ids("decode|resize(8)|keep('image', 'image/id')")
    assert with_images == [133, 139] and batches.stats()["input/skipped"] == 1
    assert ids("flatten|keep('image/id', 'captions/text')")[0] == [
        133,
        136,
        139,
    ]  # No file read: none lost.


def _text(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def test_bad_files_fail_with_what_was_expected(root, tmp_path):
    ann = f"{root}/coco/annotations/captions_val2014.json"
    karpathy = f"{root}/coco/dataset_coco.json"
    not_coco = _text(str(tmp_path / "captions_x2014.json"), open(karpathy).read())
    bbox = dict(
        images=[], annotations=[{"id": 1, "image_id": 1, "bbox": []}]
    )  # instances_*.json-like
    no_caption = _text(str(tmp_path / "captions_y2014.json"), json.dumps(bbox))
    cases = [
        (coco(root, annotations=f"{root}/no/captions_train2014.json"), "does not exist .expected an official COCO"),
        (coco(root, annotations=str(tmp_path / "a_*.json")), "matches no file"),
        (coco(root, annotations=not_coco), r"official COCO captions file .*images\[0\] lacks \['id', 'file_name'"),
        (coco(root, annotations=no_caption), r"annotations\[0\] lacks \['caption'\]"),
        (coco(root, annotations=_text(str(tmp_path / "coco.json"), "{}")), "cannot tell the image folder"),
        (coco(root, annotations=_text(str(tmp_path / "captions_z2014.json"), "{nope")), "is not JSON"),
        (coco(root, karpathy=ann), "is not Karpathy's COCO split file .*lacks \\['split', 'cocoid'"),
        (coco(root, annotations=ann), "3 images of Karpathy split 'train' .*are in none of"),
        (coco(root, "validation"), r"has the splits \['restval', 'test', 'train', 'val'\]"),
        (coco(root, "val", karpathy=None), "the official splits .'train2014', 'val2014'."),
        (coco(root, "train[1]"), "cannot read split"),
        (coco(root, images=f"{root}/vqav2"), "no image .*COCO_train2014_000000000025.jpg.*set input.data.images"),
        (coco(root, annotaions=ann), "Did you mean 'annotations'"),
        ({**coco(root), "images": None}, "needs input.data.images"),
        (vqav2(root, "test2015"), "v2_OpenEnded_mscoco_test2015_questions.json' does not exist"),
        (vqav2(root, annotations=f"{root}/vqav2/v2_OpenEnded_mscoco_{{split}}_questions.json"),
         "is not an official VQAv2 annotations file .*expected \\{'annotations'"),
        (vqav2(root, annotations=f"{root}/vqav2/v2_mscoco_val2014_annotations.json"), "have no annotation in"),
        (textvqa(root, annotations=karpathy), "is not an official TextVQA file .*expected \\{'data'"),
    ]  # fmt: skip
    for data, match in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            ip.get_builder(data)
            pytest.fail(f"no error for {match!r}")


def test_config_choices(root):
    from transfer.config import load_config_module

    caption_coco = load_config_module("configs/caption_coco.py")
    vqa = load_config_module("configs/vqa.py")

    files = caption_coco.get_config("data=coco_files")
    assert files.input.data.name == "coco_files" and files.input.data.split == "train+restval"
    assert (
        files.input.pp == caption_coco.get_config("data=coco").input.pp
    )  # The TFDS pp strings work unchanged.
    assert (files.evals.caption.data.split, files.evals.caption_test.data.split) == ("val", "test")
    v2 = vqa.get_config("data=vqav2_files")
    assert v2.evals.vqa.question_key == "question_text"
    assert vqa.get_config("data=textvqa_files").input.data.images == "textvqa/train_images"
    assert "ocrvqa" not in vqa.DATASETS
    assert set(file_sources.SOURCES) == {"coco_files", "vqav2_files", "textvqa_files"}


@pytest.fixture(scope="module")
def tok(root, tmp_path_factory):
    from transfer import tokenizer

    texts = [t for i in TRAIN2014 + VAL2014 for _, t in _captions(i)] + WORDS + ["what is"]
    return tokenizer.train_tokenizer(
        texts, str(tmp_path_factory.mktemp("tok") / "t.model"), 80, "bpe"
    )


def _run(spec, data, evals, tmp_path, tok):
    config = config_lib.load_config_file(
        os.path.join(ROOT, "configs", spec) + f",arch=tiny,tokenizer={tok.path}"
    )
    config.model_init = ""
    config.model.img.update(width=32, depth=1, num_heads=2, mlp_dim=64, num_registers=2)
    config.model.txt.update(vocab_size=tok.vocab_size, mlp_dim=64)
    config.input.data.update(data)
    config.update(
        total_steps=2, log_training_steps=1, ckpt_steps=2, eval_at_start=False, log_flops=False
    )
    config.input.batch_size, config.input.shuffle_buffer_size = 4, 8
    config.evals = {
        name: dict(cfg, batch_size=4, log_steps=None) for name, cfg in evals(config.evals).items()
    }
    config, _ = train.prepare_config(config)
    workdir = str(tmp_path)
    train.train(config, workdir, devices=jax.devices()[:1])  # One device: the cheapest compile.
    return {k for row in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) for k in row}


def test_caption_config_trains_on_coco_files(root, tok, tmp_path):
    evals = lambda e: dict(
        caption=dict(e.caption.to_dict(), metrics=("bleu", "cider"), num_samples=2)
    )
    keys = _run("caption_coco.py:data=coco_files", coco(root), evals, tmp_path, tok)
    assert {"caption/CIDEr", "caption/images", "train/loss"} <= keys


def test_vqa_config_trains_on_vqav2_files(root, tok, tmp_path):
    evals = lambda e: dict(vqa=dict(e.vqa.to_dict(), num_samples=2))
    keys = _run("vqa.py:data=vqav2_files", vqav2(root), evals, tmp_path, tok)
    assert {"vqa/accuracy", "vqa/baseline/accuracy", "train/loss"} <= keys

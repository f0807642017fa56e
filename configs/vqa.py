"""VQA fine-tune (tasks/vqa.py) of a CapPa run: the question as a decoder prefix, the answer generated after it.

  cappa train --config configs/cappa_tiny.py --workdir workdirs/cappa_tiny          # the CapPa run
  cappa train --config configs/vqa.py --workdir workdirs/vqa                        # embedded scenes_vqa
  cappa vqa --checkpoint workdirs/vqa image.png "how many shapes are there?"
  cappa train --config configs/vqa.py:data=vqav2_files,arch=b16,init=gs://B/cappa_b16,tokenizer=gs://B/c4.model \
      --config.input.data.images=$DATA/coco/{split} --workdir gs://B/vqav2

args (comma-separated):
  data=scenes (default: the embedded `scenes_vqa`, 10 answers per question)
      | vqav2_files | textvqa_files: the official files (transfer/file_sources.py; `{split}` in a path is
      the split name). TFDS has no VQAv2/TextVQA/GQA builder (big_vision's own builders are not on any
      registry), so no TFDS choice is offered; a dataset you built yourself runs with input.data.name and
      the feature keys of DATASETS overridden on the command line.
      vqav2_files: input.data.questions = "vqav2/v2_OpenEnded_mscoco_{split}_questions.json",
        input.data.annotations = "vqav2/v2_mscoco_{split}_annotations.json", input.data.images = "coco/{split}"
        (COCO_{split}_<id>.jpg); splits train2014 (trained) and val2014 (evaluated).
      textvqa_files: input.data.annotations = "textvqa/TextVQA_0.5.1_{split}.json",
        input.data.images = "textvqa/train_images" (train and val images); splits train and val.
  arch=tiny (default for scenes) | b16 (default otherwise) | l16: configs/cappa_<arch>.py's model, which
      must be the init run's.
  init=PATH: the CapPa run (workdir, or a big_vision `.npz`); default workdirs/cappa_<arch>.
  tower=frozen (default) | finetune | a float (fine-tuned with that lr multiplier, e.g. tower=0.1).
  decoder=cappa (default: loaded from init) | scratch (a new decoder on the tower).
  answer=sample (default: one of the human answers drawn per example and step, so the target distribution
      is the annotators') | majority (always their most frequent answer: a deterministic target).
  tokenizer=PATH: default configs/cappa_<arch>.py's.

The tiny scenes tokenizer has no digits, so on scenes answers are trained as number words
(`spell_numbers=True`) and predictions are mapped back to digits before scoring. Collapse check:
`eval_at_start=True`, vqa.md puts the few-shot probe and caption-scoring zero-shot before and after.
"""

import ml_collections

from tasks.config_helpers import TRANSFER_ARGS, cappa_arch, tower_schedule
from transfer.config import parse_arg

# name -> dataset (TFDS or a file source), (train, validation, test) splits, feature keys (None: absent).
DATASETS = {
    "scenes": dict(
        name="scenes_vqa",
        splits=("train", "validation", "test"),
        question="question",
        answers="answers",
        answer_type="answer_type",
        question_type="question_type",
        id="question_id",
    ),
    "vqav2_files": dict(
        name="vqav2_files",
        splits=("train2014", "val2014", "val2014"),
        question="question_text",
        answers="answers",
        answer_type="answer_type",
        question_type="question_type",
        id="question_id",
        files=dict(
            questions="vqav2/v2_OpenEnded_mscoco_{split}_questions.json",
            annotations="vqav2/v2_mscoco_{split}_annotations.json",
            images="coco/{split}",
        ),
    ),
    "textvqa_files": dict(
        name="textvqa_files",
        splits=("train", "val", "val"),
        question="question",
        answers="answers",
        answer_type=None,
        question_type=None,
        id="question_id",
        files=dict(annotations="textvqa/TextVQA_0.5.1_{split}.json", images="textvqa/train_images"),
    ),
}


def get_config(arg=None):
    args = parse_arg(arg, **TRANSFER_ARGS, answer="sample")
    if args["data"] not in DATASETS:
        raise ValueError(f"data={args['data']!r}: use one of {sorted(DATASETS)}")
    if args["decoder"] not in ("cappa", "scratch"):
        raise ValueError(f"decoder={args['decoder']!r}: use cappa or scratch")
    if args["answer"] not in ("sample", "majority"):
        raise ValueError(f"answer={args['answer']!r}: use sample or majority")
    ds, scenes = DATASETS[args["data"]], args["data"] == "scenes"
    arch = args["arch"] or ("tiny" if scenes else "b16")
    pretrain, res = cappa_arch(arch, __file__)
    tokenizer = args["tokenizer"] or pretrain.tokenizer
    max_len = int(pretrain.model.txt.max_len)

    c = ml_collections.ConfigDict()
    c.task = "tasks.vqa"
    c.seed = 0
    c.tokenizer = tokenizer
    c.model = pretrain.model.to_dict()
    c.model_init = args["init"] or f"workdirs/cappa_{arch}"
    c.model_load = dict(dont_load=["txt/.*"] if args["decoder"] == "scratch" else [])
    c.answer_len = 6 if scenes else 8
    c.question_len = max_len - c.answer_len
    c.spell_numbers = scenes  # the tiny scenes tokenizer has no digits

    train_split, val_split, test_split = ds["splits"]
    image_pp = f"decode|resize({res})|value_range(-1, 1)"
    # Training: scenes (small) keeps its decoded images and tokenized questions in memory (`cache`);
    # [-1, 1] comes last, so the answer draw sits at the same pp position either way.
    train_pp, cache = f"decode|resize({res})", "|cache" if scenes else ""
    pick = (
        "choice(key='answers', outkey='answer')"
        if args["answer"] == "sample"
        else ("majority_answer(key='answers', outkey='answer')")
    )
    spell = "|spell_numbers(key='answer')" if c.spell_numbers else ""
    c.pp_modules = ["tasks.vqa_pp"]  # vqa_answers, majority_answer, spell_numbers
    c.input = dict(
        data=dict(name=ds["name"], split=train_split, **ds.get("files", {})),
        batch_size=64 if scenes else 256,
        pp=(
            f"{train_pp}|flatten|vqa_answers(key={ds['answers']!r}, n=None, outkey='answers')"
            f"|tokenize(max_len={c.question_len}, model='{tokenizer}', key={ds['question']!r}, "
            f"outkey='prefix'){cache}|{pick}{spell}"
            f"|tokenize(max_len={c.answer_len}, model='{tokenizer}', key='answer', outkey='labels')"
            "|value_range(-1, 1)|keep('image', 'prefix', 'labels')"
        ),
        shuffle_buffer_size=5_000 if scenes else 50_000,
    )
    c.total_steps = 1_000 if scenes else 20_000
    c.optax_name = "adamw"
    c.lr = 1e-3 if scenes else 1e-4
    c.wd = 1e-4
    c.schedule, c.lr_mults = tower_schedule(args["tower"], 50 if scenes else 1_000)
    c.grad_clip_norm = 1.0
    c.log_training_steps = 50
    c.ckpt_steps = 500 if scenes else 2_000

    c.eval_at_start = True  # the "before" row of the collapse check
    log = 500 if scenes else 5_000
    vqa = dict(
        type="vqa",
        pp=image_pp,
        question_key=ds["question"],
        answers_key=ds["answers"],
        answer_type_key=ds["answer_type"],
        question_type_key=ds["question_type"],
        id_key=ds["id"],
        majority_baseline=True,
    )
    c.evals = dict(
        val=dict(type="perplexity", data=dict(split=val_split), log_steps=log),
        vqa=dict(vqa, data=dict(split=val_split), log_steps=log),
        fewshot=dict(
            type="tasks.fewshot:Evaluator",
            datasets=("scenes",) if scenes else ("imagenet2012",),
            shots=(10, 25),
            log_steps=None,
        ),
    )
    if test_split != val_split:
        c.evals.vqa_test = dict(vqa, data=dict(split=test_split), log_steps=None)
    if (
        scenes
    ):  # caption-scoring zero-shot of the decoder (configs/cappa_tiny.py's), before and after
        zeroshot = pretrain.evals.zeroshot.to_dict()
        c.evals.zeroshot = dict(
            zeroshot, data=dict(name="scenes", split="validation"), log_steps=None
        )
    return c

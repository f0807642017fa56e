"""Caption fine-tune (tasks/caption.py) of a CapPa run, scored with the COCO metrics.

  cappa train --config configs/cappa_tiny.py --workdir workdirs/cappa_tiny          # the CapPa run
  cappa train --config configs/caption_coco.py --workdir workdirs/caption           # embedded scenes
  cappa train --config configs/caption_coco.py:decoder=scratch --workdir DIR        # LiT-decoder
  cappa train --config configs/caption_coco.py:data=coco,arch=b16,init=gs://B/cappa_b16,tokenizer=gs://B/c4.model \
      --workdir gs://B/caption_coco

args (comma-separated):
  data=scenes (default: the embedded captions, 5 per image) | coco: TFDS `coco_captions` (Karpathy splits:
      train = train+restval, `val` evaluated during training, `test` at the end; `tfds build coco_captions`)
      | coco_files: the same examples and splits read from the official files (transfer/file_sources.py):
      input.data.annotations = "coco/annotations/captions_train2014.json,coco/annotations/captions_val2014.json"
      (comma-separated paths or globs), input.data.images = "coco" (holds train2014/, val2014/),
      input.data.karpathy = "coco/dataset_coco.json" (None: the official splits, e.g. split=val2014).
  arch=tiny (default for scenes) | b16 (default for coco) | l16: the architecture of configs/cappa_<arch>.py,
      which must be the init run's.
  init=PATH: the CapPa run (workdir, or a big_vision `.npz` read by pretrain/ckpt_import.py); default
      workdirs/cappa_<arch>.
  tower=frozen (default) | finetune | a float (fine-tuned with that lr multiplier, e.g. tower=0.1).
  decoder=cappa (default: loaded from init) | scratch (a new decoder on the tower: "LiT-decoder").
  tokenizer=PATH: default configs/cappa_<arch>.py's (the one the CapPa run was trained with).
  method=greedy (default) | beam: decoding for the caption evaluator (beam size 4).

Collapse check (BRIEF.md: captioning fine-tunes destroy zero-shot ability): `eval_at_start=True` runs every
evaluator on the loaded weights too, and caption.md puts the few-shot probe (only when the tower trains: a
frozen one is bit-identical) and caption-scoring zero-shot before and after side by side.
"""

import ml_collections

from tasks.config_helpers import TRANSFER_ARGS, cappa_arch, tower_schedule
from transfer.config import parse_arg
from transfer.pp_text import caption_pp

DECODERS = ("cappa", "scratch")


def get_config(arg=None):
    args = parse_arg(arg, **TRANSFER_ARGS, method="greedy")
    coco = args["data"] in ("coco", "coco_files")
    if args["data"] not in ("scenes", "coco", "coco_files"):
        raise ValueError(f"data={args['data']!r}: use scenes, coco or coco_files")
    if args["decoder"] not in DECODERS:
        raise ValueError(f"decoder={args['decoder']!r}: use one of {DECODERS}")
    arch = args["arch"] or ("b16" if coco else "tiny")
    pretrain, res = cappa_arch(arch, __file__)
    tokenizer = args["tokenizer"] or pretrain.tokenizer
    max_len = int(pretrain.model.txt.max_len)

    c = ml_collections.ConfigDict()
    c.task = "tasks.caption"
    c.seed = 0
    c.tokenizer = tokenizer
    c.model = pretrain.model.to_dict()
    c.model_init = args["init"] or f"workdirs/cappa_{arch}"
    c.model_load = dict(dont_load=["txt/.*"] if args["decoder"] == "scratch" else [])

    name, train_split, val_split, test_split = (
        ("coco_captions", "train+restval", "val", "test")
        if coco
        else ("scenes", "train", "validation", "test")
    )
    files = (
        dict(
            annotations="coco/annotations/captions_train2014.json,coco/annotations/captions_val2014.json",
            images="coco",
            karpathy="coco/dataset_coco.json",
        )
        if args["data"] == "coco_files"
        else {}
    )
    name = "coco_files" if files else name
    image_pp = f"decode|resize({res})|value_range(-1, 1)"
    c.input = dict(
        data=dict(name=name, split=train_split, **files),
        batch_size=256 if coco else 64,
        # One of the image's reference captions, drawn anew per example and step; scenes (small)
        # decodes its images and tokenizes its captions once and keeps them in memory.
        pp=caption_pp(f"decode|resize({res})", tokenizer, max_len, cached=not coco),
        shuffle_buffer_size=50_000 if coco else 5_000,
    )
    c.total_steps = 10_000 if coco else 600
    c.optax_name = "adamw"
    c.lr = 1e-4 if coco else 1e-3
    c.wd = 1e-4
    c.schedule, c.lr_mults = tower_schedule(args["tower"], 500 if coco else 50)
    c.grad_clip_norm = 1.0
    c.log_training_steps = 50
    c.ckpt_steps = 1_000 if coco else 300

    c.eval_at_start = True  # the "before" row of the collapse check
    log = 2_000 if coco else 300
    caption = dict(
        type="caption", pp=image_pp, method=args["method"], beam_size=4, constant_baseline=not coco
    )
    c.evals = dict(
        val=dict(type="perplexity", data=dict(split=val_split), log_steps=log),
        caption=dict(caption, data=dict(split=val_split), log_steps=log),
    )
    # The collapse check: the tower's few-shot probe (when the tower trains: a frozen one stays
    # bit-identical) and the caption-scoring zero-shot, before and after.
    if args["tower"] != "frozen":
        c.evals.fewshot = dict(
            type="tasks.fewshot:Evaluator",
            datasets=("imagenet2012",) if coco else ("scenes",),
            shots=(10, 25),
            log_steps=None,
        )
    if coco:
        c.evals.caption_test = dict(caption, data=dict(split=test_split), log_steps=None)
    else:  # scenes class names as captions (as configs/cappa_tiny.py's zero-shot evaluator)
        c.evals.zeroshot = dict(pretrain.evals.zeroshot.to_dict(), log_steps=None)
    return c

"""OCR fine-tune (tasks/ocr.py) of a CapPa run: read the text in an image (captioning with one reference).

  cappa train --config configs/ocr.py --workdir workdirs/ocr                        # embedded scenes_ocr

args (comma-separated):
  data=scenes (the embedded `scenes_ocr`, 32x128 word strips; the only choice: TFDS has no scene-text
      builder, TextCaps' is big_vision's own). Another dataset runs with input.data.name and the keys of
      DATASETS overridden on the command line.
  arch, init, tower, decoder, tokenizer: as configs/vqa.py.
  strip=fold (default for scenes) | resize: how a wide strip meets the square tower (below).
  case=lower (default for scenes) | keep: lower-case the targets and score case-insensitively.

How 32x128 strips meet the 64x64 tiny tower: `fold(2)` cuts the strip into its left and right halves and
stacks them (64x64, every pixel kept, no resampling): the 16x16 patches see letters at their rendered size,
and the decoder, which cross-attends to every patch, reads the top row, then the bottom row. Resizing to
64x64 (`strip=resize`) would halve the width and double the height: letters 3-5 px wide, two per patch
column, a harder read for a tiny tower. Padding to a square would waste 3/4 of the patches on background.

The tiny scenes tokenizer has no capitals (and no "j"/"z"): `case=lower` trains lower-cased targets and
scores case-insensitively (the usual scene-text protocol); the `ocr` evaluator's `reachable` says how many
references the tokenizer can write at all (the ceiling of exact match).
"""

import ml_collections

from tasks.config_helpers import TRANSFER_ARGS, cappa_arch, tower_schedule
from transfer.config import parse_arg

# name -> TFDS name, (train, validation, test) splits, the text key, the id key.
DATASETS = {
    "scenes": dict(
        name="scenes_ocr", splits=("train", "validation", "test"), text="text", id="image/id"
    ),
}


def get_config(arg=None):
    args = parse_arg(arg, **TRANSFER_ARGS, strip=None, case=None)
    if args["data"] not in DATASETS:
        raise ValueError(f"data={args['data']!r}: use one of {sorted(DATASETS)}")
    if args["decoder"] not in ("cappa", "scratch"):
        raise ValueError(f"decoder={args['decoder']!r}: use cappa or scratch")
    ds, scenes = DATASETS[args["data"]], args["data"] == "scenes"
    strip = args["strip"] or ("fold" if scenes else "resize")
    case = args["case"] or ("lower" if scenes else "keep")
    if strip not in ("fold", "resize") or case not in ("lower", "keep"):
        raise ValueError(f"strip={strip!r} / case={case!r}: use strip=fold|resize, case=lower|keep")
    arch = args["arch"] or ("tiny" if scenes else "b16")
    pretrain, res = cappa_arch(arch, __file__)
    tokenizer = args["tokenizer"] or pretrain.tokenizer
    max_len = int(pretrain.model.txt.max_len)

    c = ml_collections.ConfigDict()
    c.task = "tasks.ocr"
    c.seed = 0
    c.tokenizer = tokenizer
    c.model = pretrain.model.to_dict()
    c.model_init = args["init"] or f"workdirs/cappa_{arch}"
    c.model_load = dict(dont_load=["txt/.*"] if args["decoder"] == "scratch" else [])

    train_split, val_split, test_split = ds["splits"]
    # fold(2) then resize: 64x64 strips for the tiny tower, any larger tower gets them upsampled.
    strip_pp = f"decode|fold(2)|resize({res})" if strip == "fold" else f"decode|resize({res})"
    image_pp = f"{strip_pp}|value_range(-1, 1)"
    lower = "|lowercase(key='text')" if case == "lower" else ""
    lower_all = "|lowercase(key='texts')" if case == "lower" else ""
    tokenize = f"tokenize(max_len={max_len}, model='{tokenizer}'"
    c.pp_modules = ["tasks.ocr_pp", "tasks.vqa_pp"]  # fold, lowercase, vqa_answers
    c.input = dict(
        data=dict(name=ds["name"], split=train_split),
        batch_size=64 if scenes else 256,
        pp=(
            # scenes_ocr (one word per strip, small): strips and word ids made once, kept in memory.
            f"{strip_pp}|flatten|vqa_answers(key={ds['text']!r}, n=None, outkey='texts')"
            f"{lower_all}|{tokenize}, key='texts', outkey='text_ids')|cache"
            "|choice(key='text_ids', outkey='labels')|value_range(-1, 1)|keep('image', 'labels')"
            if scenes
            else f"{image_pp}|flatten|vqa_answers(key={ds['text']!r}, n=None, outkey='texts')"
            f"|choice(key='texts', outkey='text'){lower}"
            f"|{tokenize}, key='text', outkey='labels')|keep('image', 'labels')"
        ),
        shuffle_buffer_size=5_000 if scenes else 50_000,
    )
    c.total_steps = 1_500 if scenes else 10_000
    c.optax_name = "adamw"
    c.lr = 1e-3 if scenes else 1e-4
    c.wd = 1e-4
    c.schedule, c.lr_mults = tower_schedule(args["tower"], 50 if scenes else 500)
    c.grad_clip_norm = 1.0
    c.log_training_steps = 50
    c.ckpt_steps = 500 if scenes else 2_000

    c.eval_at_start = True
    log = 500 if scenes else 2_000
    ocr = dict(
        type="ocr",
        pp=image_pp,
        text_key=ds["text"],
        id_key=ds["id"],
        ignore_case=case == "lower",
        majority_baseline=True,
    )
    c.evals = dict(
        val=dict(type="perplexity", data=dict(split=val_split), log_steps=log),
        ocr=dict(ocr, data=dict(split=val_split), log_steps=log),
        fewshot=dict(
            type="tasks.fewshot:Evaluator",
            datasets=("scenes",) if scenes else ("imagenet2012",),
            shots=(10, 25),
            log_steps=None,
        ),
    )
    if test_split != val_split:
        c.evals.ocr_test = dict(ocr, data=dict(split=test_split), log_steps=None)
    if scenes:  # caption-scoring zero-shot of the decoder on scenes (configs/cappa_tiny.py's)
        zeroshot = pretrain.evals.zeroshot.to_dict()
        c.evals.zeroshot = dict(
            zeroshot, data=dict(name="scenes", split="validation"), log_steps=None
        )
    return c

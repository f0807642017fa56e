"""SigLiT (tasks/siglit.py) on the embedded `scenes` captions: a text tower trained with the sigmoid loss against
configs/cappa_tiny.py's frozen image tower. Minutes on 2 CPU cores.

  cappa train --config configs/cappa_tiny.py --workdir workdirs/cappa_tiny     # the tower (and its decoder)
  cappa train --config configs/siglit.py --workdir workdirs/siglit
  cappa train --config configs/siglit.py:llip,txt_init=scratch --workdir workdirs/siglit_llip

args (comma-separated):
  tower=PATH (default workdirs/cappa_tiny): the run whose image tower `img/...` is loaded and frozen. Its
      architecture must be configs/cappa_tiny.py's (64x64 images, 4 registers, width 128); another tower needs
      its config in --config.model.img.* (and, for txt_init=cappa, --config.model.txt.*).
  txt_init=cappa (default) | scratch: initialise the text tower's embedding, self-attention and MLP layers from
      the tower run's CapPa decoder (pretrain/text_encoder.py lists the paths), or from random.
  llip: Llip's head (tasks/llip.py): the tower's 4 registers mixed by a cross-attention with the caption as query.
  tokenizer=PATH (default configs/cappa_tiny.py's): the SentencePiece model the tower run was trained with.

Evaluation: `val` is the "mean" evaluator over the validation split (the task's eval_metrics: the sigmoid loss
of each image against the batch's captions, in-batch image->text / text->image top-1). Zero-shot classification
and retrieval evaluators ("zeroshot_embed", "retrieval") come from tasks/retrieval_eval.py and are added to
config.evals there.
"""

import ml_collections

from transfer.config import parse_arg, sibling
from transfer.pp_text import caption_pp

cappa_tiny = sibling(__file__, "cappa_tiny.py")

TOKENIZER = "workdirs/tokenizers/scenes_bpe256.model"
# configs/cappa_tiny.py's image tower and text decoder (the text tower mirrors the decoder's shapes).
_CAPPA = cappa_tiny.get_config().model.to_dict()
TOWER = dict(_CAPPA["img"])
TEXT = dict(_CAPPA["txt"], pool="eos")
# Parameters a CapPa run does not have: always initialised here.
NEW_PARAMS = ["img_head/.*", "llip/.*", "txt/proj/.*", "txt/map/.*", "t", "b"]
TXT_INITS = ("cappa", "scratch")


def get_config(arg=None):
    args = parse_arg(
        arg, llip=False, tower="workdirs/cappa_tiny", txt_init="cappa", tokenizer=TOKENIZER
    )
    if args["txt_init"] not in TXT_INITS:
        raise ValueError(f"txt_init={args['txt_init']!r}: use txt_init=cappa or txt_init=scratch")
    llip = args["llip"] not in (False, "False", "false")
    tokenizer = args["tokenizer"]

    c = ml_collections.ConfigDict()
    c.task = "tasks.siglit"
    c.seed = 0
    c.total_steps = 800
    c.tokenizer = tokenizer
    c.input = dict(
        data=dict(name="scenes", split="train"),
        batch_size=64,
        # A random caption per example and step; images decoded and captions tokenized once.
        pp=caption_pp("decode", tokenizer, 32, cached=True),
        shuffle_buffer_size=5_000,
    )
    c.model = dict(
        img=dict(TOWER),
        txt=dict(TEXT),
        img_head=dict(kind="map"),
        llip=dict(enabled=llip, num_heads=8, temperature=5.0),
    )
    c.logit_scale_init = 10.0
    c.logit_bias_init = -10.0
    c.loss_mode = "ring"

    c.model_init = args["tower"]
    dont_load = NEW_PARAMS + (["txt/.*"] if args["txt_init"] == "scratch" else [])
    c.model_load = dict(dont_load=dont_load)

    c.optax_name = "adamw"
    c.lr = 1e-3
    c.wd = 1e-4
    c.schedule = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=50))]
    c.grad_clip_norm = 1.0

    c.log_training_steps = 50
    c.ckpt_steps = 400
    image_pp = "decode|value_range(-1, 1)"
    c.evals = dict(
        val=dict(type="mean", data=dict(split="validation"), log_steps=200),
        # Zero-shot: the 42 scenes classes as prompts, averaged over caption-like templates.
        zeroshot=dict(
            type="zeroshot_embed",
            data=dict(split="validation"),
            pp=image_pp + "|keep('image', 'label')",
            class_names_file="configs/zeroshot/scenes_classes.txt",
            templates_file="configs/zeroshot/scenes_templates.txt",
            log_steps=400,
        ),
        # Image <-> text recall@1/5/10 over the validation images and all their captions.
        retrieval=dict(type="retrieval", data=dict(split="validation"), pp=image_pp, log_steps=400),
    )
    return c

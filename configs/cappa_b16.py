"""CapPa B/16 at 224 px with big_vision's recipe (paper's B/16 setting; big_vision trains on WebLI).

  cappa train --config configs/cappa_b16.py:tokenizer=gs://B/c4_en.model,shards=gs://B/*.tfrecord \
      --workdir gs://BUCKET/cappa_b16

LayerNorm/GELU/bias ViT-B/16 (all tokens to the decoder), 6-layer decoder of width 768 with learnt
positions and no biases (big_vision's decoder_bias=False), 64 tokens, a 32k SentencePiece vocabulary.
Adafactor, lr 1e-3, wd 1e-4, cosine with 10k warmup, clip 1.0, batch 8,192, 75% parallel prediction.
"""

import ml_collections

from transfer.config import parse_arg

TOKENIZER = "gs://YOUR_BUCKET/tokenizers/c4_en_32k.model"  # a 32,000-piece SentencePiece model
SHARDS = "gs://YOUR_BUCKET/captions/*.tfrecord"  # img2dataset tfrecord shards


def get_config(arg=None):
    args = parse_arg(arg, tokenizer=TOKENIZER, shards=SHARDS)
    tokenizer, shards = args["tokenizer"], args["shards"]
    c = ml_collections.ConfigDict()
    c.task = "pretrain.cappa_task"
    c.seed = 0
    c.total_steps = 1_000_000  # ~9B examples at batch 8,192, as in the paper
    c.masked_pred_prob = 0.75
    c.tokenizer = tokenizer

    c.input = dict(
        data=dict(name="img2dataset", pattern=shards, format="tfrecord", split="train"),
        batch_size=8_192,
        pp=(
            "decode|resize(224)|value_range(-1, 1)"
            "|flatten|choice(key='captions/text', outkey='text')"
            f"|tokenize(max_len=64, model='{tokenizer}', key='text', outkey='labels')"
            "|keep('image', 'labels')"
        ),
        shuffle_buffer_size=250_000,
    )
    c.model = dict(
        dtype="bfloat16",
        img=dict(variant="B/16", pool_type="none", scan=True, remat_policy="nothing_saveable"),
        # big_vision's decoder_bias=False (the paper's): no biases but the final LayerNorm's and the logits'.
        txt=dict(
            vocab_size=32_000,
            depth=6,
            max_len=64,
            posemb="learn",
            use_bias=False,
            norm_final_bias=True,
            scan=True,
            remat_policy="nothing_saveable",
        ),
    )

    c.optax_name = "adafactor"
    c.optax = dict(momentum=0.9, multiply_by_parameter_scale=False, clipping_threshold=None)
    c.lr = 1e-3
    c.wd = 1e-4
    c.schedule = dict(decay_type="cosine", warmup_steps=10_000)
    c.grad_clip_norm = 1.0

    c.mesh = [("data", -1)]
    c.sharding_strategy = [(".*", "fsdp")]
    c.fsdp_axes = ["data"]
    c.log_training_steps = 100
    c.ckpt_steps = 2_000
    c.keep_ckpts = 3
    c.evals = dict(
        val=dict(type="perplexity", data=dict(split="validation"), log_steps=5_000),
    )
    return c

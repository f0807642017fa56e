"""CapPa ViT-L/16 at 256 px: the seed reproduction (DataComp-1B, TPU v5e-256, batch 8,192).

  cappa train --config configs/cappa_l16.py:tokenizer=gs://B/spm_65k.model,shards=gs://B/shards/*.tar \
      --workdir gs://BUCKET/cappa_l16
  cappa info --config configs/cappa_l16.py      # vision ~328M, text ~348M (67M of it the embedding)

Vision: 24x1024, MLP 3072 GeGLU, RMSNorm with Normformer placement, no bias, learnt positions, 8 registers
kept as tokens (264 tokens). Text: 12-layer decoder of the same width, rotary positions, 64 tokens,
vocab 65,536, bias only on the vocab projection. fp32 weights, bf16 compute (attention logits, norms and
the loss stay fp32), scan + remat, FSDP over all devices. No weight decay, no dropout, no augmentation.
The reproduction used distributed Shampoo, which optax does not ship: Adafactor (big_vision's CapPa
optimizer) stands in; set `optax_name` to any optax optimizer.
"""

import ml_collections

from transfer.config import parse_arg

TOKENIZER = "gs://YOUR_BUCKET/tokenizers/spm_65k.model"  # a 65,536-piece SentencePiece model
SHARDS = "gs://YOUR_BUCKET/datacomp1b/{00000..99999}.tar"  # img2dataset webdataset shards


def get_config(arg=None):
    args = parse_arg(arg, tokenizer=TOKENIZER, shards=SHARDS)
    tokenizer, shards = args["tokenizer"], args["shards"]
    c = ml_collections.ConfigDict()
    c.task = "pretrain.cappa_task"
    c.seed = 0
    c.total_steps = 1_000_000  # ~8.2B examples seen at batch 8,192
    c.masked_pred_prob = 0.75
    c.tokenizer = tokenizer

    c.input = dict(
        data=dict(name="img2dataset", pattern=shards, format="webdataset", split="train"),
        batch_size=8_192,
        pp=(
            "decode|resize(256)|value_range(-1, 1)"
            "|flatten|choice(key='captions/text', outkey='text')"
            f"|tokenize(max_len=64, model='{tokenizer}', key='text', outkey='labels')"
            "|keep('image', 'labels')"
        ),
        shuffle_buffer_size=250_000,
    )
    c.model = dict(
        dtype="bfloat16",
        img=dict(
            width=1024,
            depth=24,
            mlp_dim=3072,
            num_heads=16,
            patch_size=16,
            norm="rmsnorm",
            normformer=True,
            mlp_type="geglu",
            use_bias=False,
            num_registers=8,
            pool_type="none",
            posemb="learn",
            scan=True,
            remat_policy="nothing_saveable",
        ),
        txt=dict(
            vocab_size=65_536,
            width=1024,
            depth=12,
            mlp_dim=3072,
            num_heads=16,
            max_len=64,
            norm="rmsnorm",
            normformer=True,
            mlp_type="geglu",
            use_bias=False,
            posemb="rope",
            scan=True,
            remat_policy="nothing_saveable",
        ),
    )

    c.optax_name = "adafactor"
    c.optax = dict(momentum=0.9, multiply_by_parameter_scale=False, clipping_threshold=None)
    c.lr = 1e-3
    c.wd = 0.0  # the reproduction: no weight decay
    c.schedule = dict(decay_type="cosine", warmup_steps=10_000)
    c.grad_clip_norm = 1.0

    c.mesh = [("fsdp", -1)]  # FSDP over all 256 chips: params, grads and optimizer state sharded.
    c.sharding_strategy = [(".*", "fsdp")]
    c.log_training_steps = 100
    c.ckpt_steps = 2_000
    c.keep_ckpts = 3
    c.evals = dict(
        val=dict(type="perplexity", data=dict(split="validation"), log_steps=5_000),
    )
    return c

"""CapPa pretraining as a task of the one train loop: ``config.task = "pretrain.cappa_task"``.

Batches hold ``image`` [B,H,W,3] and ``labels`` [B,T] (token ids, pad = ``pad_id``; the pp's ``tokenize`` op
makes them). Per example a Bernoulli(``masked_pred_prob``) draw picks Pa or Cap (see pretrain/cappa.py).
Evaluation is Cap only: ``loss`` (per-caption mean) and the ``perplexity`` evaluator (token-weighted).
Caption-scoring evaluators (zero-shot classification, pairwise choice) come from pretrain/scoring.py.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from pretrain import cappa
from transfer import evaluators as evaluators_lib
from transfer import metrics, plots

DEFAULTS = dict(
    masked_pred_prob=0.75,  # the paper's Pa fraction; 0 = plain captioning (Cap)
    label_smoothing=0.0,
    pad_id=0,
    text_key="labels",
    tokenizer=None,  # SentencePiece .model: needed by decoding/scoring evaluators and `cappa caption`
    # skip: a clip-jax CapPa's CLIP scalars (logit scale and bias), which captioning does not use.
    model_load=dict(loader="pretrain.ckpt_import:load_into", skip=["(params/)?logit_(scale|bias)"]),
    model=cappa.MODEL_DEFAULTS,
)


class Task:
    """Implements the task contract of docs/ARCHITECTURE.md."""

    def __init__(self, config: Any):
        self.config = config
        if not 0.0 <= float(config.masked_pred_prob) <= 1.0:
            raise ValueError(f"masked_pred_prob must be in [0, 1], got {config.masked_pred_prob}")
        self.model = cappa.Model(**cappa.model_kwargs(config.model))
        self.mask_id = int(config.model.txt.vocab_size)
        self.pad_id = int(config.pad_id)
        self.text_key = config.text_key
        if config.masked_pred_prob > 0 and config.model.txt.posemb == "rope":
            metrics.log(
                "note: Pa with rotary decoder positions only: all-[MASK] inputs are identical, so every "
                "position gets the same logits and Pa learns a bag of tokens (the reproduction's setting). "
                "Use model.txt.posemb='learn' for the paper's position-aware Pa."
            )

    def init_params(self, rng: jax.Array, batch: dict) -> dict:
        image = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
        tokens = jnp.zeros((1, batch[self.text_key].shape[1]), jnp.int32)
        return self.model.init({"params": rng}, image, tokens)["params"]

    def _check_labels(self, labels: jax.Array) -> None:
        max_len = int(self.config.model.txt.max_len)
        if labels.shape[1] > max_len and self.config.model.txt.posemb == "learn":
            raise ValueError(
                f"captions of {labels.shape[1]} tokens but model.txt.max_len={max_len}: "
                "tokenize with max_len <= model.txt.max_len"
            )

    def loss_fn(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        labels = batch[self.text_key]
        self._check_labels(labels)
        branch_rng, dropout_rng = jax.random.split(rng)
        p = float(self.config.masked_pred_prob)
        is_pa = jax.random.bernoulli(branch_rng, p, (labels.shape[0],))
        tokens, mask = cappa.decoder_inputs(labels, is_pa, self.mask_id)
        logits, _ = self.model.apply(
            {"params": params},
            batch["image"],
            tokens,
            mask,
            train=True,
            rngs={"dropout": dropout_rng},
        )
        losses, _ = cappa.sequence_xent(
            logits, labels, self.pad_id, float(self.config.label_smoothing)
        )
        pa = is_pa.astype(jnp.float32)
        n_pa = jnp.sum(pa)
        aux = {
            "pa_fraction": jnp.mean(pa),
            "loss_pa": jnp.sum(losses * pa) / jnp.maximum(n_pa, 1.0),
            "loss_cap": jnp.sum(losses * (1 - pa)) / jnp.maximum(len(pa) - n_pa, 1.0),
        }
        return jnp.mean(losses), aux

    def cap_logits(self, params: dict, image: jax.Array, labels: jax.Array) -> jax.Array:
        """Teacher-forced Cap logits [B,T,V] (the evaluation branch)."""
        is_pa = jnp.zeros((labels.shape[0],), bool)
        tokens, mask = cappa.decoder_inputs(labels, is_pa, self.mask_id)
        return self.model.apply({"params": params}, image, tokens, mask)[0]

    def eval_metrics(self, params: dict, batch: dict) -> dict[str, jax.Array]:
        labels = batch[self.text_key]
        logits = self.cap_logits(params, batch["image"], labels)
        losses, count = cappa.sequence_xent(logits, labels, self.pad_id)
        return {"loss": losses, "nll_sum": losses * count, "tokens": count}

    def flops_per_example(self, batch: dict) -> float | None:
        """Model FLOPs of one training example (forward + backward), for MFU.

        Counted on an unscanned, remat-free copy of the model: XLA's cost analysis counts a scanned
        layer stack once, and recomputation is not model work. Lowered only, never compiled.
        """
        from pretrain import info

        task = Task(info.unrolled(self.config))
        shapes = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in batch.items()}
        params = jax.eval_shape(task.init_params, jax.random.key(0), shapes)
        image_hw = tuple(batch["image"].shape[1:3])
        text_len = batch[self.text_key].shape[1]
        return info.xla_flops(task, params, image_hw, text_len, parts=["train_step"])["train_step"]

    def evaluators(self) -> dict[str, type]:
        from pretrain import scoring  # Lazy: it registers pp ops only evaluator pipelines use.

        return {"perplexity": PerplexityEvaluator, **scoring.EVALUATORS}

    def finalize(self, workdir: str) -> None:
        """The loop's end-of-run hook: WORKDIR/pretrain.md and curves.png."""
        write_report(workdir, self.config)


# Bookkeeping an evaluator logs next to its metrics: not results.
_BOOKKEEPING = ("seconds", "tokens", "nll_sum", "images")
_TRAINING = ("train/loss", "train/loss_cap", "train/loss_pa", "examples_per_sec", "perf/mfu")


def write_report(workdir: str, config: Any) -> str:
    """What a pretraining run reached, as a person reads it: the set-up, every evaluator's last numbers,
    the training loss from first to last log, and the curves. Returns the markdown."""
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    last = metrics.last_values(rows, first_step=0)  # a total_steps=0 run evaluates at step 0 only
    first = {k: next((r[k] for r in rows if k in r), None) for k in _TRAINING}
    kw = cappa.model_kwargs(config.model)
    img, txt = kw["img_kw"], kw["txt_kw"]
    patch = img["patch_size"]  # a variant gives (16, 16)
    patch = patch[0] if isinstance(patch, tuple | list) and len(set(patch)) == 1 else patch
    evals = [
        dict(metric=k, value=v)
        for k, v in sorted(last.items())
        if "/" in k
        and not k.startswith(("train/", "input/", "perf/", "model_init/"))
        and not k.endswith(_BOOKKEEPING)
    ]
    unused = {0.0: "train/loss_pa", 1.0: "train/loss_cap"}.get(float(config.masked_pred_prob))
    training = [
        dict(metric=k, first=first[k], last=last[k]) for k in _TRAINING if k in last and k != unused
    ]
    steps, batch = int(config.total_steps), int(config.input.batch_size)
    lines = [
        "# CapPa pretraining",
        "",
        f"- image tower: {img['depth']} x {img['width']}, patch {patch}, "
        f"{img.get('num_registers', 0)} registers; decoder: {txt['depth']} x {txt['width']}, "
        f"vocab {txt['vocab_size']}, {txt['max_len']} tokens",
        f"- objective: parallel prediction for {float(config.masked_pred_prob):.0%} of examples, "
        f"captioning for the rest; label smoothing {config.label_smoothing}",
        f"- steps: {steps}, batch {batch} ({steps * batch:,} examples); init: "
        f"`{config.get('model_init')}`",
        f"- use it: `cappa caption --checkpoint {workdir} IMAGE...`, `cappa attention --checkpoint "
        f"{workdir} IMAGE`, `cappa probe --checkpoint {workdir} --config configs/fewshot.py`",
        "",
        "## Evaluators (last evaluation)",
        "",
        plots.markdown_table(evals, ["metric", "value"]) if evals else "No evaluator ran.",
        "",
        "## Training (first and last logged value)",
        "",
        plots.markdown_table(training, ["metric", "first", "last"])
        if training
        else "No training step logged.",
        "",
        f"![curves]({os.path.basename(plots.plot_run(workdir))})",
        "",
    ]
    report = "\n".join(lines)
    with open(os.path.join(workdir, "pretrain.md"), "w") as f:
        f.write(report)
    return report


class PerplexityEvaluator(evaluators_lib.MeanEvaluator):
    """The mean evaluator plus ``perplexity = exp(total nll / total tokens)`` over the split."""

    def run(self, params: Any) -> dict[str, float]:
        out = super().run(params)
        out["perplexity"] = math.exp(out["nll_sum"] / max(out["tokens"], 1e-9))
        return out

"""VQA fine-tunes of a CapPa run: ``config.task = "tasks.vqa"`` (configs/vqa.py), and ``cappa vqa``.

The question is a PREFIX of the CapPa decoder and the answer is generated after it (pretrain/prefix_lm.py:
packed ``[START, question..., EOS, answer..., EOS]`` rows, full attention among the prefix tokens, causal
after). The loss is the token cross-entropy of the answer tokens only (its EOS included), the mean over
each example's answer tokens, then over the batch. The training pp picks the target: one of the human
answers drawn anew per example and step (``choice``), or their most frequent one (``majority_answer``).

Batches hold ``image``, ``prefix`` (question tokens [B, question_len], ``pieces, EOS, pad``) and
``labels`` (answer tokens [B, answer_len]). What the config chooses, as in tasks/caption.py: the vision
tower frozen / fine-tuned / lr-scaled, and the decoder loaded from the CapPa run in ``model_init`` or new.
``spell_numbers``: answers are trained with number words (a tokenizer without digits, like the tiny
scenes one) and predictions are turned back into digits.

Evaluation: the ``vqa`` evaluator (tasks/vqa_eval.py), ``perplexity`` (of the answers) and every CapPa
evaluator (caption-scoring zero-shot, pairwise: the collapse check); ``finalize`` writes ``vqa.md``.

    cappa vqa --checkpoint WORKDIR image.png "how many shapes are there?" ["another question" ...]

prints ``question<TAB>answer`` per question (``--json``: one object per question).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain import cappa_task, prefix_lm
from tasks import report_utils, vqa_eval, vqa_pp
from transfer import config as config_lib

DEFAULTS = dict(
    cappa_task.DEFAULTS,
    masked_pred_prob=0.0,  # must stay 0: parallel prediction has no prefix
    prefix_key="prefix",
    question_len=20,  # question tokens (tokenize max_len); question_len + answer_len <= model.txt.max_len
    answer_len=8,  # answer tokens in training, and decoded
    spell_numbers=False,
)
_REPORTED = ("accuracy", "accuracy/yes_no", "accuracy/number", "accuracy/other", "accuracy/all")


class Task(cappa_task.Task):
    """A question-prefixed CapPa decoder; implements the task contract of docs/ARCHITECTURE.md."""

    def __init__(self, config: Any):
        if float(config.masked_pred_prob) != 0.0:
            raise config_lib.ConfigError(
                f"tasks.vqa trains the answer after a question prefix; masked_pred_prob must be 0, "
                f"got {config.masked_pred_prob}."
            )
        super().__init__(config)
        self.prefix_key = config.prefix_key
        lengths = int(config.question_len) + int(config.answer_len)
        if lengths > int(config.model.txt.max_len):
            raise config_lib.ConfigError(
                f"question_len ({config.question_len}) + answer_len ({config.answer_len}) = {lengths} "
                f"> model.txt.max_len ({config.model.txt.max_len}): shorten them."
            )

    def _inputs(self, batch: dict) -> dict:
        question, answer = batch[self.prefix_key], batch[self.text_key]
        self._check_labels(jnp.zeros((1, question.shape[1] + answer.shape[1])))
        return prefix_lm.training_inputs(question, answer, self.pad_id)

    def init_params(self, rng: jax.Array, batch: dict) -> dict:
        length = batch[self.prefix_key].shape[1] + batch[self.text_key].shape[1]
        image = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
        return self.model.init({"params": rng}, image, jnp.zeros((1, length), jnp.int32))["params"]

    def answer_logits(self, params: dict, batch: dict, inputs: dict, **kwargs: Any) -> jax.Array:
        return self.model.apply(
            {"params": params}, batch["image"], inputs["tokens"], inputs["mask"], **kwargs
        )[0]

    def loss_fn(self, params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        inputs = self._inputs(batch)
        logits = self.answer_logits(params, batch, inputs, train=True, rngs={"dropout": rng})
        losses, count = prefix_lm.answer_loss(
            logits, inputs["targets"], inputs["weights"], float(self.config.label_smoothing)
        )
        return jnp.mean(losses), {"answer_tokens": jnp.mean(count)}

    def eval_metrics(self, params: dict, batch: dict) -> dict[str, jax.Array]:
        inputs = self._inputs(batch)
        logits = self.answer_logits(params, batch, inputs)
        losses, count = prefix_lm.answer_loss(logits, inputs["targets"], inputs["weights"])
        return {"loss": losses, "nll_sum": losses * count, "tokens": count}

    def flops_per_example(self, batch: dict) -> float | None:
        """CapPa's count at the packed length (the same decoder work; the mask changes no FLOPs)."""
        length = batch[self.prefix_key].shape[1] + batch[self.text_key].shape[1]
        return super().flops_per_example(
            {"image": batch["image"], self.text_key: np.zeros((1, length), np.int32)}
        )

    def evaluators(self) -> dict[str, type]:
        return {**super().evaluators(), **vqa_eval.EVALUATORS}

    def finalize(self, workdir: str) -> None:
        report_utils.write_report(
            workdir,
            self.config,
            title="VQA fine-tune",
            kind="vqa",
            metrics=_REPORTED,
            count_key="questions",
            files="vqa",
            filename="vqa.md",
        )


# ---------------------------------------------------------------------------------------------- the CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cappa vqa", description="answer questions about an image")
    p.add_argument("--checkpoint", required=True, help="workdir of a `cappa train` VQA run")
    p.add_argument("image", help="an image file (anything PIL reads)")
    p.add_argument("questions", nargs="+", help="one or more questions")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: config's)")
    p.add_argument("--image_size", type=int, default=None, help="default: the tower's resolution")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    return p


def answer_questions(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Loads the run and answers every question about the image (greedy); one dict per question."""
    from pretrain import runs

    run = runs.load_run(args.checkpoint, args.step, args.tokenizer)
    if not isinstance(run.task, Task):
        raise config_lib.InputError(
            f"{run.workdir!r} is a {run.config.task!r} run, not a tasks.vqa run."
        )
    if run.tokenizer is None:
        raise config_lib.InputError(
            f"the run in {args.checkpoint!r} has no config.tokenizer: pass --tokenizer."
        )
    size = args.image_size or runs.image_size(run.params, run.config)
    image = runs.load_images([args.image], size)
    tok, model = run.tokenizer, run.task.model
    question = tok.encode(args.questions, int(run.config.question_len))
    vocab = int(model.txt_kw["vocab_size"])
    out = prefix_lm.generate(
        model,
        run.params,
        np.repeat(image, len(question), axis=0),
        question,
        max_len=int(run.config.answer_len),
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        vocab_limit=tok.vocab_size if tok.vocab_size < vocab else None,
    )
    answers = [a.strip() for a in tok.decode(out["tokens"])]
    if run.config.get("spell_numbers"):
        answers = [vqa_pp.digits_from_words(a) for a in answers]
    return [
        {"image": args.image, "question": q, "answer": a, "logprob": float(lp)}
        for q, a, lp in zip(args.questions, answers, out["logprobs"], strict=True)
    ]


def main(argv: list[str]) -> int:
    """Entry point of `cappa vqa`; returns the exit code (2 = bad input, message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        results = answer_questions(args)
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r) if args.json else f"{r['question']}\t{r['answer']}")
    return 0

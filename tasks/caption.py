"""Caption fine-tunes: ``config.task = "tasks.caption"`` (configs/caption_coco.py).

The model and loss are CapPa's captioning branch (pretrain/cappa_task.py with ``masked_pred_prob=0``):
teacher-forced next-token cross-entropy of one reference caption per image, drawn at random per example
and step by the pp's ``choice`` op when an image has several. What the config chooses:

* the vision tower frozen (``schedule`` rule ``("img/.*", None)``: no gradient, no optimizer state),
  fine-tuned, or fine-tuned with an lr multiplier (``lr_mults``);
* the decoder loaded from the CapPa run in ``model_init``, or trained from scratch on the frozen tower
  (``model_load.dont_load=["txt/.*"]``: the paper's "LiT-decoder" protocol).

Evaluation: the ``caption`` evaluator (tasks/caption_eval.py: decode, COCO metrics, predictions JSON,
samples page) plus every CapPa evaluator (perplexity, caption-scoring zero-shot, pairwise). With
``eval_at_start=True`` every evaluator also runs on the loaded weights, and ``finalize`` writes
``caption.md``: the final caption metrics against the constant-caption baseline, and the collapse check:
each evaluator's step-0 value (the CapPa tower and decoder as loaded) next to its final value.
"""

from __future__ import annotations

from pretrain import cappa_task
from tasks import caption_eval, report_utils

DEFAULTS = dict(cappa_task.DEFAULTS, masked_pred_prob=0.0)
_REPORTED = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE", "BLEU-1")


class Task(cappa_task.Task):
    """CapPa's task with captioning as the default branch, the caption evaluator and a report."""

    def evaluators(self) -> dict[str, type]:
        return {**super().evaluators(), **caption_eval.EVALUATORS}

    def finalize(self, workdir: str) -> None:
        report_utils.write_report(
            workdir,
            self.config,
            title="Caption fine-tune",
            kind="caption",
            metrics=_REPORTED,
            count_key="images",
            files="captions",
            filename="caption.md",
        )

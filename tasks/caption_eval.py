"""The `caption` evaluator: decode an eval split with the task's captioner and score it with the COCO metrics.

    evals.test = dict(type="caption", data=dict(name="coco_captions", split="val"),
                      pp="decode|resize(224)|value_range(-1, 1)", method="beam", beam_size=4)

Any task with a CapPa `model` (`model.txt_kw`, `Model.encode` + decoder) and a tokenizer can use it: the
caption fine-tune (tasks/caption.py) and CapPa pretraining itself. `pp` preprocesses the image only; the
references are read once, at start-up, from `caption_key` of every example (so a wrong key fails before
training), keyed by `id_key` (one id per image, as COCO's `image/id`).

Decoding runs on the loop's mesh (images split over the batch axes, params as they are sharded); tokens and
ids are gathered from every host, so the scores cover the whole split on pods too. Metrics are
tasks/caption_metrics.py's (PTB tokenisation, BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE when its jars are
present): with `constant_baseline=True` the same metrics of the most frequent training caption predicted
for every image are reported as `baseline/<metric>` (computed once; the references do not change).

After each run the loop calls `write(workdir, step, name)`: `captions/<name>_step<N>.json` (COCO results
format: `[{"image_id", "caption"}]`) and `captions/<name>_samples.html` (the first `num_samples` images
with the generated and reference captions).
"""

from __future__ import annotations

import base64
import collections
import html
import io
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tasks import caption_metrics, retrieval_eval  # retrieval_eval: SplitPass, `first_texts` pp op
from transfer import evaluators, input_pipeline, pp_text, sharding

DEFAULTS = dict(
    type="caption",
    data=None,  # merged over config.input.data; set at least `split`
    pp=None,  # image preprocessing, e.g. "decode|resize(224)|value_range(-1, 1)"
    batch_size=None,  # None = config.input.batch_size
    log_steps=None,
    caption_key="captions/text",  # the reference captions (a sequence of strings per image)
    id_key="image/id",
    max_refs=5,  # references kept per image (COCO has 5, a few images 6-7)
    method="greedy",  # "greedy" | "beam" | "sample" (pretrain/decode.py)
    beam_size=4,
    length_penalty=0.0,
    max_len=None,  # None = the decoder's max_len
    metrics=caption_metrics.METRICS,
    tokenizer=None,  # None = config.tokenizer
    num_samples=16,  # images on the samples page
    constant_baseline=False,  # also score the most frequent training caption for every image
    seed=0,  # for method="sample"
)


def require_captioner(task: Any, where: str) -> None:
    model = getattr(task, "model", None)
    if model is None or not hasattr(model, "txt_kw"):
        raise ValueError(f"the caption evaluator needs a CapPa captioner task; {where} has none.")


def read_references(data: Mapping[str, Any], caption_key: str, id_key: str, max_refs: int) -> dict:
    """{image id: [reference captions]} of a whole split, read on this host without decoding images."""
    pp = f"flatten|first_texts(key={caption_key!r}, n={int(max_refs)}, outkey='refs')|keep({id_key!r}, 'refs')"
    refs: dict[int, list[str]] = {}
    batches = input_pipeline.eval_batches(
        {"data": dict(data), "pp": pp}, batch_size=256, process_index=0, process_count=1
    )
    for batch in batches:
        for image_id, texts, real in zip(batch[id_key], batch["refs"], batch["_mask"], strict=True):
            if not real:
                continue
            image_id = int(image_id)
            if image_id in refs:
                raise ValueError(
                    f"caption evaluator: id {image_id} occurs twice in {dict(data)}; `id_key` "
                    f"({id_key!r}) must identify images (one example per image)."
                )
            refs[image_id] = [t.decode("utf-8").strip() for t in texts if t.strip()]
    empty = [i for i, r in refs.items() if not r]
    if not refs or len(empty) == len(refs):
        raise ValueError(
            f"caption evaluator: no references under {caption_key!r} in {dict(data)}; check caption_key."
        )
    if empty:
        raise ValueError(
            f"caption evaluator: {len(empty)} image(s) without a reference caption (e.g. id {empty[0]})."
        )
    return refs


def most_frequent_caption(data: Mapping[str, Any], caption_key: str) -> str:
    """The constant-caption baseline: the training split's most frequent caption (ties: the first seen)."""
    pp = f"flatten|first_texts(key={caption_key!r}, n=8, outkey='refs')|keep('refs')"
    counts: collections.Counter = collections.Counter()
    batches = input_pipeline.eval_batches(
        {"data": dict(data), "pp": pp}, batch_size=256, process_index=0, process_count=1
    )
    for batch in batches:
        for texts, real in zip(batch["refs"], batch["_mask"], strict=True):
            if real:
                counts.update(t.decode("utf-8").strip() for t in texts if t.strip())
    if not counts:
        raise ValueError(f"constant baseline: no captions under {caption_key!r} in {dict(data)}.")
    return counts.most_common(1)[0][0]


def _gather(x: Any) -> np.ndarray:
    """A global array or a host-local numpy array -> the full array on every host (rows host-major)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class CaptionEvaluator:
    """COCO metrics of captions decoded from one pass over the eval split (see the module docstring)."""

    def __init__(self, eval_cfg: Mapping, *, task: Any, config: Any, **kwargs: Any):
        self.cfg = cfg = evaluators.settings(eval_cfg, DEFAULTS, "caption")
        require_captioner(task, f"task {config.task!r}")
        if not cfg["pp"]:
            raise ValueError(
                "caption evaluator: set `pp` (image preprocessing that produces 'image'), e.g. "
                '"decode|resize(224)|value_range(-1, 1)".'
            )
        if cfg["method"] not in ("greedy", "beam", "sample"):
            raise ValueError(
                f"caption evaluator: method={cfg['method']!r}; use greedy, beam or sample."
            )
        unknown = [m for m in cfg["metrics"] if m not in caption_metrics.METRICS]
        if unknown:
            raise ValueError(
                f"caption evaluator: unknown metrics {unknown}; use {caption_metrics.METRICS}."
            )
        path = cfg["tokenizer"] or config.get("tokenizer")
        if not path:
            raise ValueError("caption evaluator: set config.tokenizer (or evals.<name>.tokenizer).")
        self.tokenizer = pp_text.get_tokenizer(path, pad_id=getattr(task, "pad_id", None))
        self.model = task.model
        self.max_len = int(cfg["max_len"] or self.model.txt_kw["max_len"])
        id_key = cfg["id_key"]
        eval_cfg = dict(data=cfg["data"], pp=f"{cfg['pp']}|keep('image', {id_key!r})")
        eval_cfg["batch_size"] = cfg["batch_size"]
        self.pass_ = retrieval_eval.SplitPass(
            eval_cfg, ("image", id_key), "caption", task=task, config=config, **kwargs
        )
        data = self.pass_.input_cfg["data"]
        self.refs = read_references(data, cfg["caption_key"], id_key, cfg["max_refs"])
        self.constant = None
        if cfg["constant_baseline"]:
            self.constant = most_frequent_caption(config.input.data, cfg["caption_key"])
        self._baseline: dict[str, float] | None = None
        self._last: dict[str, Any] = {}

    def _decode(self, params: Any, images: np.ndarray) -> np.ndarray:
        from pretrain import decode

        images = sharding.put_batch({"image": images}, self.pass_.batch_sharding)["image"]
        vocab = int(self.model.txt_kw["vocab_size"])
        out = decode.generate(
            self.model, params, images, max_len=self.max_len, eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id, method=self.cfg["method"], beam_size=int(self.cfg["beam_size"]),
            length_penalty=float(self.cfg["length_penalty"]), rng=jax.random.key(int(self.cfg["seed"])),
            vocab_limit=self.tokenizer.vocab_size if self.tokenizer.vocab_size < vocab else None,
            keep_on_device=True,
        )  # fmt: skip
        return _gather(out["tokens"][:, 0])

    def predict(self, params: Any) -> tuple[dict[int, str], list[tuple[np.ndarray, int]]]:
        """{image id: generated caption} over the split, and (image, id) of the first samples."""
        id_key, preds, samples = self.cfg["id_key"], {}, []
        for batch in self.pass_.batches():
            tokens = self._decode(params, batch["image"])
            ids, mask = _gather(batch[id_key]), _gather(batch["_mask"])
            texts = self.tokenizer.decode(tokens)
            preds.update({int(i): t for i, t, real in zip(ids, texts, mask, strict=True) if real})
            for image, image_id, real in zip(
                batch["image"], batch[id_key], batch["_mask"], strict=True
            ):
                if real and len(samples) < int(self.cfg["num_samples"]):
                    samples.append((np.asarray(image), int(image_id)))
        return preds, samples

    def run(self, params: Any) -> dict[str, float]:
        preds, samples = self.predict(params)
        missing = set(preds) - set(self.refs)
        if missing:
            raise ValueError(
                f"caption evaluator: ids {sorted(missing)[:5]} were decoded but have no references."
            )
        refs = {i: self.refs[i] for i in preds}
        result = caption_metrics.score(refs, preds, metrics=list(self.cfg["metrics"]))
        out = dict(result["scores"])
        lengths = [len(p.split()) for p in preds.values()]
        out.update(
            images=len(preds),
            mean_words=float(np.mean(lengths)) if lengths else 0.0,
            distinct_captions=len(set(preds.values())) / max(len(preds), 1),
        )
        if self.constant is not None:
            if self._baseline is None:
                constant = {i: self.constant for i in preds}
                scores = caption_metrics.score(refs, constant, metrics=list(self.cfg["metrics"]))
                self._baseline = scores["scores"]
            out.update({f"baseline/{k}": v for k, v in self._baseline.items()})
        self._last = dict(preds=preds, samples=samples, refs=refs, skipped=result["skipped"])
        return out

    def write(self, workdir: str, step: int, name: str) -> None:
        """`captions/<name>_step<N>.json` (COCO results) and `captions/<name>_samples.html`."""
        if not self._last:
            return
        folder = os.path.join(workdir, "captions")
        os.makedirs(folder, exist_ok=True)
        caption_metrics.write_coco_results(
            self._last["preds"], os.path.join(folder, f"{name}_step{step}.json")
        )
        page = samples_html(
            self._last["samples"], self._last["preds"], self._last["refs"],
            title=f"{name}: step {step}, {self.cfg['method']} decoding",
            notes=[f"{k} skipped: {v}" for k, v in self._last["skipped"].items()],
        )  # fmt: skip
        with open(os.path.join(folder, f"{name}_samples.html"), "w", encoding="utf-8") as f:
            f.write(page)


def png_data_uri(image: np.ndarray) -> str:
    """An image in [-1, 1] (or uint8) as an inline PNG, so a page is one self-contained file."""
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = np.clip((pixels + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def samples_html(
    samples: list[tuple[np.ndarray, int]],
    preds: Mapping[int, str],
    refs: Mapping[int, list[str]],
    *,
    title: str,
    notes: list[str] = (),
) -> str:
    """A page of images, each with its generated caption (bold) and its references."""
    cells = []
    for image, image_id in samples:
        references = "".join(f"<li>{html.escape(r)}</li>" for r in refs.get(image_id, []))
        cells.append(
            f'<div class="s"><img src="{png_data_uri(image)}" width="160"><br>'
            f"<b>{html.escape(preds.get(image_id, ''))}</b><br><small>id {image_id}</small>"
            f"<ul>{references}</ul></div>"
        )
    note = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    style = (
        "body{font-family:sans-serif} .s{display:inline-block;width:260px;vertical-align:top;"
        "margin:6px} img{image-rendering:pixelated}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{note}{''.join(cells)}"
        "</body></html>"
    )


EVALUATORS = {"caption": CaptionEvaluator}

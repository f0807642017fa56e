"""The skeleton the caption, VQA and OCR evaluators share, so each keeps only what differs.

One pass over the eval split on the loop's mesh (the engine's `SplitPass`: images, and the subclass's other inputs,
split over the batch axes, params as they are sharded), decoded by the task's CapPa model; tokens and ids are
gathered from every host, so the scores cover the whole split on pods too. The references are read once, at
start-up (a wrong key fails before training), keyed by `id_key`; a baseline is scored once, on the first run's ids.
After each run the loop calls `write(workdir, step, name)`: `<FOLDER>/<name>_step<N>.json` and
`<FOLDER>/<name>_samples.html` (the first `num_samples` images with the generated text and the references).

A subclass sets `KIND`, `FOLDER`, `DEFAULTS` (with `data`, `pp`, `batch_size`, `id_key`, `max_len`, `tokenizer`,
`num_samples`) and `METHODS`, and provides `check_task`, `references`, `score` and `write_results`; the other
hooks have defaults (captioner decoding with `method`, `beam_size`, `length_penalty`, `seed`).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from transfer import contracts, evaluators, pp_text, sharding


def id_value(value: Any) -> Any:
    """An id from a batch: int for integer ids, str for byte-string ids (GQA's question ids)."""
    return value.decode("utf-8") if isinstance(value, bytes) else int(value)


class GenerationEvaluator:
    """Decode a split, score it against references, a baseline once, results JSON and a samples page."""

    KIND = ""  # the evaluator type, in messages
    FOLDER = ""  # workdir/<FOLDER>/ holds the files `write` makes
    DEFAULTS: Mapping[str, Any] = {}
    METHODS: tuple[str, ...] = ("greedy",)
    PP_EXAMPLE = "decode|resize(224)|value_range(-1, 1)"

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        self.cfg = cfg = evaluators.settings(eval_cfg, self.DEFAULTS, self.KIND)
        task, config = ctx.task, ctx.config
        self.check_task(task, config)
        if not cfg["pp"]:
            raise ValueError(
                f"{self.KIND} evaluator: set `pp` (image preprocessing that produces 'image'), e.g. "
                f'"{self.PP_EXAMPLE}".'
            )
        method = cfg.get("method", "greedy")
        if method not in self.METHODS:
            raise ValueError(
                f"{self.KIND} evaluator: method={method!r}; use {' or '.join(self.METHODS)}."
            )
        path = cfg["tokenizer"] or config.get("tokenizer")
        if not path:
            raise ValueError(
                f"{self.KIND} evaluator: set config.tokenizer (or evals.<name>.tokenizer)."
            )
        self.tokenizer = pp_text.get_tokenizer(path, pad_id=getattr(task, "pad_id", None))
        self.task, self.model = task, task.model
        self.max_len = int(cfg["max_len"] or self.default_max_len(config))
        vocab = int(self.model.txt_kw["vocab_size"])
        self.vocab_limit = self.tokenizer.vocab_size if self.tokenizer.vocab_size < vocab else None
        keys = (*self.input_keys(), cfg["id_key"])
        split_cfg = dict(
            data=cfg["data"],
            pp=f"{cfg['pp']}{self.extra_pp(path, config)}|keep({', '.join(map(repr, keys))})",
            batch_size=cfg["batch_size"],
        )
        self.pass_ = evaluators.SplitPass(split_cfg, ctx, keys, self.KIND)
        self.refs = self.references(self.pass_.input_cfg["data"], config)
        self._baseline: dict[str, float] | None = None
        self._last: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------- what differs
    def check_task(self, task: Any, config: Any) -> None:
        """Refuse a task (or settings) this evaluator cannot serve, naming why."""
        raise NotImplementedError

    def references(self, data: Mapping[str, Any], config: Any) -> dict[Any, Any]:
        """{id: what the predictions are scored against} of the whole eval split `data`."""
        raise NotImplementedError

    def score(self, preds: Mapping[Any, str]) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, extra entries for the files `write` makes) of {id: predicted text}."""
        raise NotImplementedError

    def baseline(self, preds: Mapping[Any, str]) -> dict[str, float]:
        """`baseline/...` metrics of a trivial predictor over the same ids ({}: none)."""
        return {}

    def write_results(self, preds: Mapping[Any, str], path: str) -> None:
        raise NotImplementedError

    def input_keys(self) -> tuple[str, ...]:
        """Batch keys that go to the devices (besides the id)."""
        return ("image",)

    def extra_pp(self, tokenizer_path: str, config: Any) -> str:
        """Ops appended to `pp` (starting with "|") that make the other input keys."""
        return ""

    def default_max_len(self, config: Any) -> int:
        return int(self.model.txt_kw["max_len"])

    def generate(self, params: Any, arrays: Mapping[str, jax.Array]) -> jax.Array:
        """Tokens [B, L] of a global batch: the captioner's decoding by `method`."""
        from pretrain import decode

        out = decode.generate(
            self.model,
            params,
            arrays["image"],
            max_len=self.max_len,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            method=self.cfg["method"],
            beam_size=int(self.cfg["beam_size"]),
            length_penalty=float(self.cfg["length_penalty"]),
            rng=jax.random.key(int(self.cfg["seed"])),
            vocab_limit=self.vocab_limit,
            keep_on_device=True,
        )
        return out["tokens"][:, 0]

    def texts(self, tokens: np.ndarray) -> list[str]:
        return self.tokenizer.decode(tokens)

    def page(self, last: Mapping[str, Any]) -> tuple[Mapping, Mapping, list[str]]:
        """(shown text per id, references per id, notes) of the samples page."""
        return last["preds"], self.refs, []

    def describe(self) -> str:
        """How the texts were made, for the samples page's title."""
        return str(self.cfg.get("method", "greedy"))

    # ---------------------------------------------------------------------------------- the skeleton
    def predict(self, params: Any) -> tuple[dict[Any, str], list[tuple[np.ndarray, Any]]]:
        """{id: generated text} over the split, and (image, id) of the first samples."""
        id_key, preds, samples = self.cfg["id_key"], {}, []
        for batch in self.pass_.batches():
            arrays = {k: batch[k] for k in self.input_keys()}
            arrays = sharding.put_batch(arrays, self.pass_.batch_sharding)
            texts = self.texts(evaluators.gather(self.generate(params, arrays)))
            ids, mask = evaluators.gather(batch[id_key]), evaluators.gather(batch["_mask"])
            preds.update(
                {id_value(i): t for i, t, real in zip(ids, texts, mask, strict=True) if real}
            )
            for image, i, real in zip(batch["image"], batch[id_key], batch["_mask"], strict=True):
                if real and len(samples) < int(self.cfg["num_samples"]):
                    samples.append((np.asarray(image), id_value(i)))
        return preds, samples

    def run(self, params: Any) -> dict[str, float]:
        preds, samples = self.predict(params)
        unknown = [i for i in preds if i not in self.refs]
        if unknown:
            raise ValueError(
                f"{self.KIND} evaluator: ids {unknown[:5]} were decoded but have no references."
            )
        out, extra = self.score(preds)
        if self._baseline is None:  # The references do not change: scored once.
            self._baseline = self.baseline(preds)
        out.update(self._baseline)
        self._last = dict(preds=preds, samples=samples, **extra)
        return out

    def write(self, workdir: str, step: int, name: str) -> None:
        """`<FOLDER>/<name>_step<N>.json` and `<FOLDER>/<name>_samples.html`."""
        if not self._last:
            return
        folder = os.path.join(workdir, self.FOLDER)
        os.makedirs(folder, exist_ok=True)
        self.write_results(self._last["preds"], os.path.join(folder, f"{name}_step{step}.json"))
        shown, refs, notes = self.page(self._last)
        page = samples_html(
            self._last["samples"],
            shown,
            refs,
            title=f"{name}: step {step}, {self.describe()}",
            notes=notes,
        )
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
    samples: list[tuple[np.ndarray, Any]],
    preds: Mapping[Any, str],
    refs: Mapping[Any, Sequence[str]],
    *,
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """A page of images, each with its generated text (bold) and its references."""
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

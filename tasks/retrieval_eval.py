"""Zero-shot classification and image<->text retrieval for tasks that embed images and texts (SigLiT, Llip).

A task qualifies with three methods: `embed_images(params, images) -> image repr [B, ...]`,
`embed_texts(params, tokens [N, L]) -> [N, D]` (L2-normalised) and `similarity(params, image_repr, text_emb)
-> [B, N]` (Llip mixes its tokens per pair inside `similarity`, so both evaluators serve it unchanged).
tasks/siglit.py registers the two types:

    evals.zs = dict(type="zeroshot_embed", data=dict(split="test"), pp="decode|resize(224)|value_range(-1, 1)",
                    class_names_file="configs/zeroshot/scenes_classes.txt",
                    templates_file="configs/zeroshot/scenes_templates.txt")
    evals.ret = dict(type="retrieval", data=dict(name="coco_captions", split="test"),
                     pp="decode|resize(224)|value_range(-1, 1)", caption_key="captions/text")

`zeroshot_embed`: class names inline (`class_names`), from a file (`class_names_file`) or from the data
(`class_names_from="tfds:label"`); templates inline or from `templates_file` (tasks/zeroshot.py reads both
formats). The prompts of every (template, class) are tokenised with the run's tokenizer and embedded once per
evaluation in batches of `text_batch_size`; a class embedding is the mean over its templates, re-normalised.
Each image scores `similarity` against every class: `prec@1`, `prec@5` against `label_key` (`classes`: C).

`retrieval`: `pp` preprocesses the image; the evaluator appends ops that keep the first `max_captions`
strings of `caption_key` (fewer is fine, absent ones are masked) and tokenises them on the host. Every
image and caption of the split is embedded (the embeddings of each global batch are gathered on every host),
then the image x caption similarity is computed in blocks of `image_chunk` x `text_chunk` (images split over
the batch axes) keeping only each row's and column's top k, so memory grows with a block, not the matrix.
`i2t_recall@k`: fraction of images (with >= 1 caption) with one of their captions among their top k captions;
`t2i_recall@k`: fraction of captions whose image is among their top k images (`images`, `texts`: the counts).
Ties rank the earlier embedded image or caption first, as a stable sort would. `data.name` is any TFDS dataset
with a sequence of caption strings per image: `coco_captions` (`caption_key="captions/text"`), a Flickr30k
build, or the embedded `scenes` locally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain import scoring
from tasks import zeroshot
from transfer import contracts, evaluators, pp_text, sharding

_COMMON = dict(
    type=None, data=None, pp=None, batch_size=None, log_steps=None, tokenizer=None, max_len=None
)
ZEROSHOT_DEFAULTS = dict(
    _COMMON,
    class_names=None,  # Exactly one of class_names, class_names_file, class_names_from.
    class_names_file=None,
    class_names_from=None,  # "tfds:FEATURE" (a ClassLabel's names) or "package.module:ATTR".
    templates=None,  # None and no templates_file: "{}".
    templates_file=None,
    label_key="label",
    text_batch_size=None,  # Prompts per embedding call; None = batch_size.
)
RETRIEVAL_DEFAULTS = dict(
    _COMMON,
    caption_key="captions/text",
    max_captions=5,
    ks=(1, 5, 10),
    image_chunk=None,  # None = batch_size.
    text_chunk=1024,
)


# ---------------------------------------------------------------------------------------------- core
def block_top_k(
    sim: jax.Array, num_rows: jax.Array, num_cols: jax.Array, k: int
) -> tuple[jax.Array, ...]:
    """Top k of each row and column of a similarity block (rows >= num_rows / cols >= num_cols are
    padding, scored -inf): (row values [R, k], row col-indices, col values [C, k], col row-indices)."""
    rows, cols = jnp.arange(sim.shape[0]) < num_rows, jnp.arange(sim.shape[1]) < num_cols
    sim = jnp.where(rows[:, None] & cols[None, :], sim.astype(jnp.float32), -jnp.inf)
    row_v, row_i = jax.lax.top_k(sim, min(k, sim.shape[1]))  # Ties: the lower index first.
    col_v, col_i = jax.lax.top_k(sim.T, min(k, sim.shape[0]))
    return row_v, row_i, col_v, col_i


def merge_top_k(values: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row's candidates by (value descending, index ascending)."""
    order = np.lexsort((index, -values), axis=-1)[:, :k]
    return np.take_along_axis(values, order, -1), np.take_along_axis(index, order, -1)


def retrieval_recalls(
    block: Callable[..., Sequence[np.ndarray]],
    image_repr: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    image_chunk: int,
    text_chunk: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways; caption j belongs to image `caption_image[j]`.

    `block(images [image_chunk, ...], texts [text_chunk, D], num_rows, num_cols, k)` returns `block_top_k`
    of their similarity; chunks are zero-padded to full size (one compiled shape). Each image keeps its k
    best captions and each caption its k best images over all blocks; padding only ever sits at the end,
    so an index >= the number of images/captions marks an empty slot.
    """
    num_images, num_texts, k = len(image_repr), len(text_emb), max(ks)
    best_texts = [
        np.full((num_images, k), -np.inf, np.float32),
        np.full((num_images, k), num_texts),
    ]
    best_images = [
        np.full((num_texts, k), -np.inf, np.float32),
        np.full((num_texts, k), num_images),
    ]

    def chunk(x: np.ndarray, start: int, size: int) -> np.ndarray:
        part = x[start : start + size]
        return np.concatenate([part, np.zeros((size - len(part), *x.shape[1:]), x.dtype)])

    def update(best: list[np.ndarray], where: slice, values: np.ndarray, index: np.ndarray) -> None:
        values = np.concatenate([best[0][where], values], 1)
        best[0][where], best[1][where] = merge_top_k(
            values, np.concatenate([best[1][where], index], 1), k
        )

    for i0 in range(0, num_images, image_chunk):
        images, rows = chunk(image_repr, i0, image_chunk), min(image_chunk, num_images - i0)
        for t0 in range(0, num_texts, text_chunk):
            cols = min(text_chunk, num_texts - t0)
            out = block(images, chunk(text_emb, t0, text_chunk), rows, cols, k)
            row_v, row_i, col_v, col_i = (np.asarray(x) for x in out)
            update(best_texts, slice(i0, i0 + rows), row_v[:rows], row_i[:rows] + t0)
            update(best_images, slice(t0, t0 + cols), col_v[:cols], col_i[:cols] + i0)
    owner = np.append(np.asarray(caption_image, np.int64), -1)  # Empty slots -> -1: never a match.
    i2t = owner[np.minimum(best_texts[1], num_texts)] == np.arange(num_images)[:, None]  # [I, k]
    t2i = np.where(best_images[1] < num_images, best_images[1], -1) == owner[:-1, None]  # [T, k]
    has_caption = np.isin(np.arange(num_images), owner[:-1])
    out = {}
    for kk in ks:
        out[f"i2t_recall@{kk}"] = float(np.mean(np.any(i2t[has_caption, :kk], axis=1)))
        out[f"t2i_recall@{kk}"] = float(np.mean(np.any(t2i[:, :kk], axis=1)))
    return out


# ---------------------------------------------------------------------------------------------- evaluators
_settings = evaluators.settings


class _EmbeddingEvaluator:
    """Shared set-up: settings, the task's text side (tokenizer, max_len) and the mesh plumbing."""

    KIND = ""
    DEFAULTS: Mapping[str, Any] = _COMMON

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        self.cfg = cfg = _settings(eval_cfg, self.DEFAULTS, self.KIND)
        task, config = ctx.task, ctx.config
        zeroshot.require_embedder(task, f"task {config.task!r}")
        if not cfg["pp"]:
            raise ValueError(
                f"{self.KIND} evaluator: set `pp` (it must produce 'image'), e.g. "
                '"decode|resize(224)|value_range(-1, 1)".'
            )
        path = cfg["tokenizer"] or config.get("tokenizer")
        if not path:
            raise ValueError(
                f"{self.KIND} evaluator: set config.tokenizer (or evals.<name>.tokenizer)."
            )
        self.tokenizer = pp_text.get_tokenizer(path, pad_id=getattr(task, "pad_id", None))
        self.max_len = int(cfg["max_len"] or zeroshot.text_max_len(task, config))
        self.task, self.mesh, self.batch_sharding = task, ctx.mesh, ctx.batch_sharding
        self.replicated = sharding.replicated(ctx.mesh)
        self.ctx = ctx

    def global_array(self, x: np.ndarray, split: bool) -> jax.Array:
        """A host array every process holds in full -> a global array (rows split over the batch axes)."""
        where = self.batch_sharding if split else self.replicated
        return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

    def check_multiple(self, size: int, what: str) -> int:
        sharding.check_batch_size(
            int(size), self.mesh, self.ctx.batch_axes(), f"{self.KIND} {what}"
        )
        return int(size)


class ZeroShotEmbedEvaluator(_EmbeddingEvaluator):
    """prec@1 / prec@5 of the class whose (template-ensembled) text embedding is most similar."""

    KIND = "zeroshot_embed"
    DEFAULTS = ZEROSHOT_DEFAULTS

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        cfg, task = self.cfg, self.task
        self.label_key = cfg["label_key"]
        self.images = evaluators.SplitPass(cfg, ctx, ("image", self.label_key), self.KIND)
        self.class_names = zeroshot.resolve_class_names(cfg, self.images.input_cfg["data"])
        self.templates = zeroshot.resolve_templates(cfg)
        prompts = scoring.class_prompts(self.class_names, self.templates)
        self.tokens = scoring.encode_prompts(self.tokenizer, prompts, self.max_len)
        self.text_batch_size = self.check_multiple(
            cfg["text_batch_size"] or self.images.batch_size, "text_batch_size"
        )
        param_sh = ctx.param_shardings
        self._embed_texts = jax.jit(
            task.embed_texts,
            in_shardings=(param_sh, self.batch_sharding),
            out_shardings=self.replicated,
        )
        self._sums = jax.jit(
            self._batch_sums, in_shardings=(param_sh, self.batch_sharding, self.replicated)
        )

    def class_embeddings(self, params: Any) -> np.ndarray:
        """[C, D]: every prompt embedded (batches of `text_batch_size`), templates ensembled."""
        embed = lambda tokens: self._embed_texts(params, self.global_array(tokens, True))
        return zeroshot.class_embeddings(
            embed, self.tokens, len(self.templates), self.text_batch_size, self.tokenizer.pad_id
        )

    def _batch_sums(self, params: Any, batch: dict, classes: jax.Array) -> dict[str, jax.Array]:
        sim = self.task.similarity(params, self.task.embed_images(params, batch["image"]), classes)
        top = jax.lax.top_k(sim.astype(jnp.float32), min(5, sim.shape[1]))[1]  # Ties: lower index.
        hits = top == batch[self.label_key].astype(jnp.int32)[:, None]
        mask = batch["_mask"].astype(jnp.float32)
        return {
            "prec@1": jnp.sum(hits[:, 0] * mask),
            "prec@5": jnp.sum(jnp.any(hits, axis=1) * mask),
            "_count": jnp.sum(mask),
        }

    def _check_labels(self, labels: np.ndarray) -> None:
        n = len(self.class_names)
        if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) >= n:
            raise ValueError(
                f"zeroshot_embed: {self.label_key!r} must be class indices in [0, {n}) (one per example); "
                f"got shape {labels.shape}, range [{labels.min(initial=0)}, {labels.max(initial=0)}]: "
                "check the class names."
            )

    def run(self, params: Any) -> dict[str, float]:
        classes = self.global_array(self.class_embeddings(params), False)
        totals: dict[str, float] = {}
        for batch in self.images.batches():
            self._check_labels(batch[self.label_key])
            out = self._sums(params, sharding.put_batch(batch, self.batch_sharding), classes)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("_count", 0.0)
        if count == 0:
            raise ValueError(
                f"Evaluation data {self.images.input_cfg['data']} produced no examples."
            )
        return {**{k: v / count for k, v in totals.items()}, "classes": len(self.class_names)}


class RetrievalEvaluator(_EmbeddingEvaluator):
    """Image->text and text->image recall@k over all images and captions of a split."""

    KIND = "retrieval"
    DEFAULTS = RETRIEVAL_DEFAULTS

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        cfg, n = self.cfg, int(self.cfg["max_captions"])
        self.ks = tuple(int(k) for k in cfg["ks"])
        if not self.ks or min(self.ks) < 1 or n < 1 or int(cfg["text_chunk"]) < 1:
            raise ValueError(
                f"retrieval evaluator: ks must be positive integers and max_captions, text_chunk >= 1; got "
                f"ks={cfg['ks']}, max_captions={n}, text_chunk={cfg['text_chunk']}."
            )
        texts = (
            f"transfer.evaluators.first_texts(key={cfg['caption_key']!r}, n={n}, outkey='texts')"
        )
        full_pp = f"{cfg['pp']}|flatten|{texts}|keep('image', 'texts')"
        self.pass_ = evaluators.SplitPass(dict(cfg, pp=full_pp), ctx, ("image", "texts"), self.KIND)
        self.image_chunk = self.check_multiple(
            cfg["image_chunk"] or self.pass_.batch_size, "image_chunk"
        )
        self.text_chunk = int(cfg["text_chunk"])
        param_sh, rep = ctx.param_shardings, self.replicated
        self._embed = jax.jit(
            self._embed_batch, in_shardings=(param_sh, self.batch_sharding), out_shardings=rep
        )
        self._block = jax.jit(
            self._block_top_k,
            in_shardings=(param_sh, self.batch_sharding, rep, rep, rep),
            out_shardings=rep,
        )

    def _embed_batch(self, params: Any, batch: dict) -> tuple[jax.Array, ...]:
        """Gathered on every host: image repr [B, ...], caption embeddings [B, n, D] and both masks."""
        b, n, length = batch["tokens"].shape
        texts = self.task.embed_texts(params, batch["tokens"].reshape(b * n, length))
        images = self.task.embed_images(params, batch["image"])
        return images, texts.reshape(b, n, -1), batch["_mask"], batch["text_mask"]

    def _block_top_k(self, params, images, texts, rows, cols) -> tuple[jax.Array, ...]:
        return block_top_k(self.task.similarity(params, images, texts), rows, cols, max(self.ks))

    def _device_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Tokenises the captions on the host; absent (empty) captions and padding rows are masked."""
        texts = [t.decode("utf-8").strip() for t in batch["texts"].reshape(-1)]
        present = np.asarray([bool(t) for t in texts]).reshape(batch["texts"].shape)
        tokens = self.tokenizer.encode(texts, self.max_len).reshape(*present.shape, self.max_len)
        text_mask = (present & (batch["_mask"][:, None] > 0)).astype(np.float32)
        return {
            "image": batch["image"],
            "tokens": tokens,
            "text_mask": text_mask,
            "_mask": batch["_mask"],
        }

    def embed_split(self, params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image repr [I, ...], caption embeddings [T, D], image index of each caption [T])."""
        parts = []
        for batch in self.pass_.batches():
            local = sharding.put_batch(self._device_batch(batch), self.batch_sharding)
            parts.append([np.asarray(x) for x in self._embed(params, local)])
        images, texts, image_mask, text_mask = (np.concatenate(p) for p in zip(*parts, strict=True))
        keep = image_mask > 0
        if not keep.any():
            raise ValueError(
                f"Evaluation data {self.pass_.input_cfg['data']} produced no examples."
            )
        new_index = np.cumsum(keep) - 1
        rows, cols = np.nonzero(text_mask > 0)  # Row-major: an image's captions in their order.
        if not len(rows):
            raise ValueError(
                f"retrieval: no image of {self.pass_.input_cfg['data']} has a caption under "
                f"{self.cfg['caption_key']!r}: check caption_key."
            )
        return images[keep], texts[rows, cols], new_index[rows]

    def run(self, params: Any) -> dict[str, float]:
        images, texts, caption_image = self.embed_split(params)

        def block(image_chunk, text_chunk, rows, cols, k):
            put = lambda x, split: self.global_array(np.asarray(x), split)
            args = (put(image_chunk, True), put(text_chunk, False), put(np.int32(rows), False))
            return self._block(params, *args, put(np.int32(cols), False))

        out = retrieval_recalls(
            block, images, texts, caption_image, self.image_chunk, self.text_chunk, self.ks
        )
        return {**out, "images": len(images), "texts": len(texts)}


EVALUATORS = {"zeroshot_embed": ZeroShotEmbedEvaluator, "retrieval": RetrievalEvaluator}

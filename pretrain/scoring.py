"""Caption scoring with the Cap branch: zero-shot classification and pairwise caption choice.

A captioner is a conditional language model, so it classifies without a head: the score of class
``c`` for an image is the log-likelihood of a caption naming ``c`` (``template.format(name)``),
teacher-forced through the Cap branch (causal self-attention, inputs shifted right). The image is
encoded once; the decoder then runs on every (image, caption) pair of a chunk of
``class_batch_size`` captions, so memory grows with the chunk, never with the number of classes.

Scores are summed over a caption's non-pad tokens (EOS included: a caption that should go on is
less likely to stop), or averaged over them with ``normalize=True`` (length normalisation, so
long class names are not penalised for their length). Several templates are combined by
AVERAGING LOG-LIKELIHOODS over templates (the log of the geometric mean of the caption
probabilities): every template counts equally, whereas averaging probabilities would let the one
template the model finds most likely decide alone.

Evaluators (``evals.<name>.type``, merged into the CapPa task's evaluators by pretrain/cappa_task.py):

* ``zeroshot``: prec@1 / prec@5 of the best-scoring class caption against ``label_key``.
* ``pairwise`` (SugarCrepe style): each example has an image and two tokenized captions made by the
  pp (``positive_key``, ``negative_key``); ``accuracy`` = fraction where the positive scores
  strictly higher (a tie counts as wrong). The ``swap_word`` pp op below makes attribute-swap
  negatives from a dataset's own captions (e.g. the colour word of a ``scenes`` caption).

Both read data with the engine's ``evaluators.SplitPass`` (every host runs the same number of
batches, padding masked by ``_mask``) and run one jitted function on the mesh: the batch split
by ``batch_sharding``, parameters by ``param_shardings``, class captions replicated.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from pretrain import cappa
from transfer import contracts, evaluators, input_pipeline, pp, pp_text, registry, sharding

# ----------------------------------------------------------------------------- core functions


def _token_logprobs(model: Any, params: Any, encoded: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[m, t] | tokens[m, <t], image m) [M, T], float32; encoded [M, N, E]."""
    inputs = cappa.shift_right(tokens)
    mask = cappa.causal_mask(tokens.shape[1])
    logits = model.apply({"params": params}, inputs, encoded, mask, method="decode")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def _reduce(logp: jax.Array, tokens: jax.Array, pad_id: int, normalize: bool) -> jax.Array:
    weights = (tokens != pad_id).astype(jnp.float32)
    total = jnp.sum(logp * weights, axis=-1)
    return total / jnp.maximum(jnp.sum(weights, axis=-1), 1.0) if normalize else total


def _score_chunk(model, params, encoded, tokens, pad_id, normalize) -> jax.Array:
    """[B, C]: every image against every caption of one chunk (B*C decoder rows)."""
    b, c, t = encoded.shape[0], tokens.shape[0], tokens.shape[1]
    enc = jnp.broadcast_to(encoded[:, None], (b, c, *encoded.shape[1:]))
    tok = jnp.broadcast_to(tokens[None], (b, c, t)).reshape(b * c, t)
    logp = _token_logprobs(model, params, enc.reshape(b * c, *encoded.shape[1:]), tok)
    return _reduce(logp, tok, pad_id, normalize).reshape(b, c)


def score_captions(
    model: Any,
    params: Any,
    encoded: jax.Array,
    tokens: jax.Array,
    pad_id: int,
    normalize: bool = False,
    class_batch_size: int | None = None,
) -> jax.Array:
    """Log-likelihood [B, C] of each caption ``tokens`` [C, T] for each image ``encoded`` [B, N, E].

    ``encoded`` comes from ``Model.encode`` (once per image). Captions follow the tokenizer's
    convention (pieces, EOS, pad); the sum (or mean if ``normalize``) runs over non-pad tokens.
    ``class_batch_size`` bounds the decoder rows to B * class_batch_size: the captions are padded
    to whole chunks and scanned with ``lax.map`` (one compiled chunk body). Pure and jit-friendly.
    """
    c, t = tokens.shape
    if not class_batch_size or class_batch_size >= c:
        return _score_chunk(model, params, encoded, tokens, pad_id, normalize)
    k = int(class_batch_size)
    n = math.ceil(c / k)
    chunks = jnp.pad(tokens, ((0, n * k - c), (0, 0)), constant_values=pad_id).reshape(n, k, t)
    out = jax.lax.map(
        lambda chunk: _score_chunk(model, params, encoded, chunk, pad_id, normalize), chunks
    )  # [n, B, k]
    return jnp.transpose(out, (1, 0, 2)).reshape(encoded.shape[0], n * k)[:, :c]


def score_pairs(
    model: Any,
    params: Any,
    encoded: jax.Array,
    tokens: jax.Array,
    pad_id: int,
    normalize: bool = False,
) -> jax.Array:
    """Log-likelihood [B, K] of each image's OWN captions ``tokens`` [B, K, T] (e.g. K=2: a
    positive and a negative), same reduction as ``score_captions``."""
    b, k, t = tokens.shape
    enc = jnp.broadcast_to(encoded[:, None], (b, k, *encoded.shape[1:]))
    flat = tokens.reshape(b * k, t)
    logp = _token_logprobs(model, params, enc.reshape(b * k, *encoded.shape[1:]), flat)
    return _reduce(logp, flat, pad_id, normalize).reshape(b, k)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Template-major captions: ``[t.format(n) for t in templates for n in class_names]``."""
    return [t.format(n) for t in templates for n in class_names]


def average_templates(scores: jax.Array, num_templates: int) -> jax.Array:
    """[B, K*C] scores of ``class_prompts`` order -> [B, C] mean log-likelihood over templates."""
    b, kc = scores.shape
    return jnp.mean(scores.reshape(b, num_templates, kc // num_templates), axis=1)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(prompts), max_len]; a prompt that would be truncated is an error (its score
    would silently belong to another caption)."""
    lengths = [len(ids) + 1 for ids in tokenizer.processor.encode(list(prompts))]
    worst = int(np.argmax(lengths))
    if lengths[worst] > max_len:
        raise ValueError(
            f"class caption {prompts[worst]!r} needs {lengths[worst]} tokens (with EOS) but "
            f"max_len is {max_len}: shorten the template/class name or raise max_len (at most "
            "model.txt.max_len with learnt positions)."
        )
    return tokenizer.encode(list(prompts), max_len)


# ----------------------------------------------------------------------------- pp op


@pp.register("swap_word")
def get_swap_word(words: Sequence[str], key: str = "text", outkey: str | None = None) -> pp.Op:
    """Attribute-swap hard negative: the first space-separated word of the scalar string ``key``
    that is one of ``words`` becomes ANOTHER word of ``words`` (uniform, seeded by the example's
    stream position); the rest of the text is unchanged. A text with none of ``words`` fails the
    example (the pipeline drops and counts it: an unchanged "negative" would be no negative).
    E.g. ``swap_word(words=('red', 'blue', 'green'), key='text', outkey='negative_text')``.
    """
    vocab = list(dict.fromkeys(str(w) for w in words))
    if len(vocab) < 2 or any(not w or " " in w for w in vocab):
        raise ValueError(f"swap_word: words must be >= 2 distinct single words, got {words!r}")
    salt = zlib.crc32(b"swap_word") << 20

    def op(example: pp.Example) -> pp.Example:
        if "_seed" not in example:
            raise KeyError("swap_word needs example['_seed'] (the input pipeline adds it)")
        table = tf.constant(vocab)
        parts = tf.strings.split(tf.convert_to_tensor(example[key]), " ")
        hits = tf.equal(parts[:, None], table[None, :])  # [words in text, vocab]
        found = tf.reduce_any(hits, axis=1)
        check = tf.debugging.Assert(tf.reduce_any(found), [f"swap_word: no word of {vocab}"])
        with tf.control_dependencies([check]):
            where = tf.argmax(tf.cast(found, tf.int32), output_type=tf.int32)
        which = tf.argmax(tf.cast(hits[where], tf.int32), output_type=tf.int32)
        seed = pp.offset_seed(example["_seed"], salt)
        shift = tf.random.stateless_uniform(
            [], seed, minval=1, maxval=len(vocab), dtype=tf.int32, alg="philox"
        )
        new = tf.gather(table, (which + shift) % len(vocab))
        parts = tf.tensor_scatter_nd_update(parts, [[where]], new[None])
        return {**example, outkey or key: tf.strings.reduce_join(parts, separator=" ")}

    return op


# ----------------------------------------------------------------------------- evaluators

_COMMON = dict(type=None, data=None, pp=None, batch_size=None, log_steps=None, normalize=False)
ZEROSHOT_DEFAULTS = dict(
    _COMMON,
    class_names=None,  # list of names, or:
    class_names_from=None,  # "package.module:ATTR" or "tfds:FEATURE" (a ClassLabel's names)
    templates=("{}",),
    label_key="label",
    class_batch_size=None,  # None = all class captions at once
    max_len=None,  # None = model.txt.max_len
    tokenizer=None,  # None = config.tokenizer
)
PAIRWISE_DEFAULTS = dict(_COMMON, positive_key="positive", negative_key="negative")


_settings = evaluators.settings


class _ScoringEvaluator:
    """Shared plumbing: settings, the CapPa model, one `SplitPass` over the split, the masked-sum loop."""

    KIND = ""
    DEFAULTS: Mapping[str, Any] = _COMMON

    def _input_keys(self) -> tuple[str, ...]:
        """Batch keys the jitted function reads (besides `_mask`); others stay on the host."""
        raise NotImplementedError

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        self.cfg = _settings(eval_cfg, self.DEFAULTS, self.KIND)
        self.input_keys = self._input_keys()
        task, config = ctx.task, ctx.config
        if not isinstance(getattr(task, "model", None), cappa.Model):
            raise ValueError(
                f"The {self.KIND!r} evaluator needs the CapPa task (pretrain.cappa_task)."
            )
        if not self.cfg["pp"]:
            raise ValueError(
                f"{self.KIND} evaluator: set `pp` (producing {self.input_keys}), e.g. "
                "\"decode|value_range(-1, 1)|keep('image', 'label')\"."
            )
        self.model, self.pad_id = task.model, int(task.pad_id)
        self.txt_cfg = config.model.txt
        self.pass_ = evaluators.SplitPass(self.cfg, ctx, self.input_keys, self.KIND)
        self.input_cfg = self.pass_.input_cfg
        self.mesh, self.batch_sharding = ctx.mesh, ctx.batch_sharding
        self.param_shardings = ctx.param_shardings

    def _check_len(self, length: int, what: str) -> None:
        if length > int(self.txt_cfg.max_len) and self.txt_cfg.posemb == "learn":
            raise ValueError(
                f"{what} have {length} tokens but model.txt.max_len={self.txt_cfg.max_len} "
                "(learnt positions): tokenize with max_len <= model.txt.max_len."
            )

    def _check(self, batch: Mapping[str, np.ndarray]) -> None:
        """Host-side checks of a local batch before it goes to the devices."""

    def _sums(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        raise NotImplementedError

    def run(self, params: Any) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in self.pass_.batches():
            self._check(batch)
            out = self._sums(params, sharding.put_batch(batch, self.batch_sharding))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("_count", 0.0)
        if count == 0:
            raise ValueError(f"Evaluation data {self.input_cfg['data']} produced no examples.")
        return {k: v / count for k, v in totals.items()}


def _masked_sums(values: Mapping[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
    mask = mask.astype(jnp.float32)
    out = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in values.items()}
    return {**out, "_count": jnp.sum(mask)}


def resolve_class_names(cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> list[str]:
    """``class_names`` (a list) or ``class_names_from``: "tfds:FEATURE" (ClassLabel names of the
    eval dataset) or an import string "package.module:ATTR" naming a sequence of strings."""
    names, source = cfg.get("class_names"), cfg.get("class_names_from")
    if (names is None) == (source is None):
        raise ValueError("zeroshot evaluator: set exactly one of class_names and class_names_from.")
    if source is not None:
        if source.startswith("tfds:"):
            feature = input_pipeline.get_builder(data_cfg).info.features[source[5:]]
            if not hasattr(feature, "names"):
                raise ValueError(f"class_names_from={source!r}: that feature is not a ClassLabel.")
            names = feature.names
        else:
            names = registry.import_object(source)
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names) or not names:
        raise ValueError(
            f"class names must be a non-empty list of non-empty strings, got {names!r}"
        )
    return list(names)


class ZeroShotEvaluator(_ScoringEvaluator):
    """prec@1 / prec@5 of zero-shot classification by class-caption likelihood."""

    KIND = "zeroshot"
    DEFAULTS = ZEROSHOT_DEFAULTS

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        cfg, config = self.cfg, ctx.config
        if cfg["class_batch_size"] is not None and int(cfg["class_batch_size"]) < 1:
            raise ValueError(
                f"class_batch_size must be >= 1 or None, got {cfg['class_batch_size']}"
            )
        self.class_names = resolve_class_names(cfg, self.input_cfg["data"])
        templates = [cfg["templates"]] if isinstance(cfg["templates"], str) else cfg["templates"]
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(
                f"templates must be a non-empty list with '{{}}' in each: {templates!r}"
            )
        self.num_templates = len(templates)
        path = cfg["tokenizer"] or config.get("tokenizer")
        if not path:
            raise ValueError(
                "zeroshot evaluator: set config.tokenizer (or evals.<name>.tokenizer)."
            )
        tok = pp_text.get_tokenizer(path)
        if tok.pad_id != self.pad_id:
            raise ValueError(f"tokenizer pad id {tok.pad_id} != config.pad_id {self.pad_id}.")
        max_len = int(cfg["max_len"] or self.txt_cfg.max_len)
        self._check_len(max_len, "class captions")
        prompts = encode_prompts(tok, class_prompts(self.class_names, templates), max_len)
        # The decoder is causal: columns past the longest prompt's EOS are pad in every row and
        # change no score, so they are cut (the demo's 84 scenes prompts: 5 of 32 columns).
        prompts = prompts[:, : int((prompts != self.pad_id).sum(1).max())]
        replicated = sharding.replicated(self.mesh)
        self.prompts = jax.make_array_from_callback(prompts.shape, replicated, lambda i: prompts[i])
        shardings = (self.param_shardings, self.batch_sharding, replicated)
        self._jitted = jax.jit(self._batch_sums, in_shardings=shardings)

    def _input_keys(self) -> tuple[str, ...]:
        return ("image", self.cfg["label_key"])

    def class_scores(self, params: Any, image: jax.Array, prompts: jax.Array) -> jax.Array:
        """[B, num classes] template-averaged scores (the evaluator's prediction is the argmax)."""
        encoded, _ = self.model.apply({"params": params}, image, method="encode")
        scores = score_captions(
            self.model,
            params,
            encoded,
            prompts,
            self.pad_id,
            bool(self.cfg["normalize"]),
            self.cfg["class_batch_size"],
        )
        return average_templates(scores, self.num_templates)

    def _batch_sums(self, params: Any, batch: dict, prompts: jax.Array) -> dict[str, jax.Array]:
        scores = self.class_scores(params, batch["image"], prompts)
        label = batch[self.cfg["label_key"]]
        top = jax.lax.top_k(scores, min(5, scores.shape[1]))[1]
        hits = top == label[:, None]
        return _masked_sums({"prec@1": hits[:, 0], "prec@5": jnp.any(hits, axis=1)}, batch["_mask"])

    def _check(self, batch: Mapping[str, np.ndarray]) -> None:
        labels = batch[self.cfg["label_key"]]
        if (
            labels.ndim != 1
            or labels.min(initial=0) < 0
            or labels.max(initial=0) >= len(self.class_names)
        ):
            raise ValueError(
                f"zeroshot: {self.cfg['label_key']!r} must be class indices in "
                f"[0, {len(self.class_names)}) (one per example); got shape {labels.shape}, "
                f"range [{labels.min(initial=0)}, {labels.max(initial=0)}]: check class_names."
            )

    def _sums(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        return self._jitted(params, batch, self.prompts)


class PairwiseEvaluator(_ScoringEvaluator):
    """``accuracy``: how often the positive caption beats the negative one (SugarCrepe style)."""

    KIND = "pairwise"
    DEFAULTS = PAIRWISE_DEFAULTS

    def __init__(self, eval_cfg: Mapping, ctx: contracts.EvalContext):
        super().__init__(eval_cfg, ctx)
        shardings = (self.param_shardings, self.batch_sharding)
        self._jitted = jax.jit(self._batch_sums, in_shardings=shardings)

    def _input_keys(self) -> tuple[str, ...]:
        return ("image", self.cfg["positive_key"], self.cfg["negative_key"])

    def pair_scores(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """[B, 2] scores of (positive, negative)."""
        pos, neg = batch[self.cfg["positive_key"]], batch[self.cfg["negative_key"]]
        if pos.shape != neg.shape or pos.ndim != 2:
            raise ValueError(
                f"pairwise: positive/negative must be token ids [B, T] of one shape (tokenize "
                f"both with the same max_len); got {pos.shape} and {neg.shape}."
            )
        self._check_len(pos.shape[1], "pairwise captions")
        encoded, _ = self.model.apply({"params": params}, batch["image"], method="encode")
        tokens = jnp.stack([pos, neg], axis=1)
        return score_pairs(
            self.model, params, encoded, tokens, self.pad_id, bool(self.cfg["normalize"])
        )

    def _batch_sums(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        scores = self.pair_scores(params, batch)
        return _masked_sums({"accuracy": scores[:, 0] > scores[:, 1]}, batch["_mask"])

    def _sums(self, params: Any, batch: dict) -> dict[str, jax.Array]:
        return self._jitted(params, batch)


EVALUATORS = {"zeroshot": ZeroShotEvaluator, "pairwise": PairwiseEvaluator}

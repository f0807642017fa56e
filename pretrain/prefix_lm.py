"""Prefix language modelling with the CapPa decoder: a text prefix (a VQA question) given, the answer generated.

Layout (one packed row per example, shared by training, decoding and the uncached reference)::

    [START, q_1 .. q_n, a_1 .. a_m, pad ...]       n = the question's non-pad tokens (its EOS included)

The question tokens come from the ``tokenize`` pp op (``pieces, EOS, pad``): its EOS stays in the prefix
as the separator, and the prefix ``[START, q_1..q_n]`` has ``1 + n`` tokens, a per-example length. The
answer starts right after it, so its positions depend on the question's length (packed, no padding in
between: the learnt position embedding sees the same positions in training and decoding).

Attention (``prefix_mask``): prefix tokens attend to every prefix token (bidirectional), every later
token attends causally (to the whole prefix and the earlier answer tokens). The loss (``answer_loss``)
covers the answer tokens only, its EOS included: the target of position j is row[j + 1], counted when
it is an answer token; per example it is the mean over the answer tokens, then the mean over the batch.

Decoding (``generate``, greedy): the prefix goes through the decoder ONCE with the prefix mask; the
self-attention keys/values of every layer (captured from the ``key``/``value`` projections, rotated for
rotary positions) and the cross-attention keys/values become the KV cache, each row's position index
set to its own prefix length. The decoder's cache writes one slot per call at the batch's first row's
position, so the one-token steps run per row under ``jax.vmap`` (batch 1 inside): every row writes at
its own position, and the decoder's causal cache mask hides the slots past it (the prefix padding,
overwritten before it becomes visible). ``use_cache=False`` recomputes the packed row with the prefix
mask at every step: the reference the tests compare the cache against.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pretrain import cappa, decode, decoder

_COMPILED: dict[tuple, tuple[Any, Any]] = {}  # (id(model), settings) -> (model, jitted fn)


# ----------------------------------------------------------------------------------- layout, mask, loss
def prefix_lengths(question: jax.Array, pad_id: int) -> jax.Array:
    """[B] tokens of each prefix: START + the question's non-pad tokens (EOS included)."""
    return 1 + jnp.sum(question != pad_id, axis=1).astype(jnp.int32)


def pack(question: jax.Array, answer: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Packed rows [B, 1 + Lq + La] (see the module docstring) and the prefix lengths [B].

    ``question`` [B, Lq] must be ``pieces, EOS, pad`` (non-pad tokens first); ``answer`` [B, La] is
    placed whole right after the prefix (trailing pads included).
    """
    b, lq = question.shape
    plen = prefix_lengths(question, pad_id)
    total = 1 + lq + answer.shape[1]
    j = jnp.arange(total)[None, :] - 1  # index into [question tokens, answer tokens]
    from_answer = j >= plen[:, None] - 1
    source = jnp.where(from_answer, lq + j - (plen[:, None] - 1), j)
    pool = jnp.concatenate(
        [question, answer, jnp.full((b, 1), pad_id, question.dtype)], axis=1
    ).astype(jnp.int32)
    source = jnp.clip(jnp.where(source < lq + answer.shape[1], source, pool.shape[1] - 1), 0)
    rows = jnp.take_along_axis(pool, source, axis=1)
    rows = jnp.where(j < 0, cappa.START_ID, rows)
    return rows, plen


def prefix_mask(plen: jax.Array, length: int) -> jax.Array:
    """[B, 1, T, T] boolean, True = may attend: causal, plus full attention among the prefix tokens."""
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    in_prefix = (q[None] < plen[:, None, None]) & (k[None] < plen[:, None, None])
    return ((k <= q)[None] | in_prefix)[:, None]


def training_inputs(question: jax.Array, answer: jax.Array, pad_id: int) -> dict[str, jax.Array]:
    """Decoder ``tokens`` [B, T], ``mask`` [B,1,T,T], ``targets`` [B, T], ``weights`` [B, T] (1 = an
    answer token), T = Lq + La: the packed row without its last token, targets shifted by one."""
    rows, plen = pack(question, answer, pad_id)
    tokens, targets = rows[:, :-1], rows[:, 1:]
    length = tokens.shape[1]
    n_answer = jnp.sum(answer != pad_id, axis=1)
    pos = jnp.arange(length)[None, :] + 1  # position of each target in the packed row
    weights = (pos >= plen[:, None]) & (pos < (plen + n_answer)[:, None])
    return dict(
        tokens=tokens,
        mask=prefix_mask(plen, length),
        targets=targets,
        weights=weights.astype(jnp.float32),
    )


def answer_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Per-example mean token cross-entropy over the answer tokens [B], and their count [B]."""
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(targets, logits.shape[-1])
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    token_loss = optax.softmax_cross_entropy(logits, onehot)
    count = jnp.sum(weights, axis=-1)
    return jnp.sum(token_loss * weights, axis=-1) / jnp.maximum(count, 1.0), count


# ----------------------------------------------------------------------------------------- the KV cache
def _kv_only(module: Any, method_name: str) -> bool:
    return method_name == "__call__" and module.name in ("key", "value")


def _prefill(model: cappa.Model, params: Any, encoded: jax.Array, question: jax.Array, pad_id: int):
    """Logits [B, V] after each prefix, and the decoder cache holding the prefix (see module docstring)."""
    rows, plen = pack(question, question[:, :0], pad_id)  # [B, 1 + Lq]: the prefixes, padded
    length = rows.shape[1]
    logits, captured = model.apply(
        {"params": params},
        rows,
        encoded,
        prefix_mask(plen, length),
        method=cappa.Model.decode,
        capture_intermediates=_kv_only,
        mutable=["intermediates"],
    )
    captured = captured["intermediates"]
    start = jnp.zeros((rows.shape[0], 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda p, t, e: model.apply(
            {"params": p}, t, e, decode=True, method=cappa.Model.decode, mutable=["cache"]
        )[1]["cache"],
        params,
        start,
        encoded,
    )
    rope = model.txt_kw.get("posemb") == "rope"
    positions = jnp.broadcast_to(jnp.arange(length)[None], rows.shape)

    def fill(path, shape):
        names = [k.key for k in path]
        if names[-1] == "index":
            return plen.astype(shape.dtype)
        node = captured
        for name in names[:-1]:
            node = node[name]
        kv = node["key" if names[-1] == "cached_key" else "value"]["__call__"][0]
        scanned = "blocks" in names  # captured [depth, B, T, H, D]; the cache wants [B, depth, ...]
        if names[-2] == "self_attn":
            if rope and names[-1] == "cached_key":
                kv = decoder.rope(kv, positions)
            pad = [(0, 0)] * kv.ndim
            pad[-3] = (0, shape.shape[-3] - kv.shape[-3])
            kv = jnp.pad(kv, pad)
        if scanned:
            kv = jnp.moveaxis(kv, 0, 1)
        return kv.astype(shape.dtype)

    cache = jax.tree_util.tree_map_with_path(fill, shapes)
    last = jnp.take_along_axis(logits, (plen - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


def _cached_step(model: cappa.Model, params: Any, cache: Any, tokens: jax.Array):
    """One token [B] per row at each row's own position: logits [B, V] and the new cache."""

    def one(row_cache, token):
        row_cache = jax.tree.map(lambda x: x[None], row_cache)
        logits, out = model.apply(
            {"params": params, "cache": row_cache},
            token[None, None],
            None,
            decode=True,
            method=cappa.Model.decode,
            mutable=["cache"],
        )
        return logits[0, 0], jax.tree.map(lambda x: x[0], out["cache"])

    return jax.vmap(one)(cache, tokens)


def _recompute(model, params, encoded, question, answer, t, pad_id: int) -> jax.Array:
    """The reference: logits [B, V] after the prefix and ``answer[:, :t]``, from the full packed rows."""
    inputs = training_inputs(question, answer, pad_id)
    logits = model.apply(
        {"params": params}, inputs["tokens"], encoded, inputs["mask"], method=cappa.Model.decode
    )
    where = prefix_lengths(question, pad_id) - 1 + t
    return jnp.take_along_axis(logits, where[:, None, None], axis=1)[:, 0]


# ------------------------------------------------------------------------------------------- greedy loop
def _greedy(model, params, encoded, question, settings: tuple) -> dict:
    max_len, eos_id, pad_id, vocab_limit, use_cache = settings
    rows = encoded.shape[0]
    tokens = jnp.full((rows, max_len), pad_id, jnp.int32)
    if use_cache:
        logits, state = _prefill(model, params, encoded, question, pad_id)
    else:
        logits, state = _recompute(model, params, encoded, question, tokens, 0, pad_id), None

    carry = dict(
        t=jnp.int32(0),
        tokens=tokens,
        logprobs=jnp.zeros((rows,), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=jnp.zeros((rows,), bool),
        logits=logits,
        state=state,
    )

    def choose(c):
        logp = jax.nn.log_softmax(decode.forbid_ids(c["logits"], pad_id, vocab_limit))
        tok = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        tok_logp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        done = c["done"]
        tok = jnp.where(done, pad_id, tok)
        return dict(
            c,
            tokens=jax.lax.dynamic_update_slice_in_dim(c["tokens"], tok[:, None], c["t"], axis=1),
            logprobs=c["logprobs"] + jnp.where(done, 0.0, tok_logp),
            lengths=jnp.where(done, c["lengths"], c["t"] + 1),
            done=done | (tok == eos_id),
        )

    def body(c):
        c = choose(c)
        if use_cache:
            last = jax.lax.dynamic_index_in_dim(c["tokens"], c["t"], axis=1, keepdims=False)
            logits, state = _cached_step(model, params, c["state"], last)
        else:
            logits = _recompute(model, params, encoded, question, c["tokens"], c["t"] + 1, pad_id)
            state = None
        return dict(c, t=c["t"] + 1, logits=logits, state=state)

    def cond(c):
        return (c["t"] < max_len - 1) & ~jnp.all(c["done"])

    c = choose(jax.lax.while_loop(cond, body, carry))
    return {k: c[k] for k in ("tokens", "logprobs", "lengths")}


def _compiled(model: cappa.Model, settings: tuple) -> Any:
    key = (id(model), settings)
    if key not in _COMPILED:

        def run(params, images, question):
            encoded, _ = model.apply({"params": params}, images, method=cappa.Model.encode)
            return _greedy(model, params, encoded, question, settings)

        _COMPILED[key] = (model, jax.jit(run))  # the entry holds the model: its id stays unique
    return _COMPILED[key][1]


def generate(
    model: cappa.Model,
    params: Any,
    images: Any,
    question: Any,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int = 0,
    vocab_limit: int | None = None,
    use_cache: bool = True,
    keep_on_device: bool = False,
) -> dict[str, Any]:
    """Greedy answers to ``question`` tokens [B, Lq] (``pieces, EOS, pad``) about ``images`` [B,H,W,3].

    Returns ``tokens`` [B, max_len] (``pieces, EOS, pad``), ``logprobs`` [B] (summed up to EOS) and
    ``lengths`` [B] (tokens up to and including EOS), as numpy unless ``keep_on_device`` (``images``
    and ``question`` may then be global arrays sharded over a mesh). As in pretrain/decode.py, the
    answer never holds ``pad_id`` (the tokenizer's) nor ids >= ``vocab_limit`` (capped at the model's
    ``vocab_size``, the [MASK] id): ``decode.forbid_ids`` removes them, and the log-probs are those of
    the model's distribution renormalised over the other ids.
    """
    txt_len, vocab = int(model.txt_kw["max_len"]), int(model.txt_kw["vocab_size"])
    vocab_limit = vocab if vocab_limit is None else min(int(vocab_limit), vocab)
    lq = int(np.shape(question)[1]) if np.ndim(question) == 2 else -1
    problems = [
        (np.ndim(images) == 4, f"images must be [B, H, W, 3], got shape {np.shape(images)}"),
        (lq > 0, f"question must be [B, Lq] token ids, got shape {np.shape(question)}"),
        (len(images) == len(question), f"{len(images)} images but {len(question)} questions"),
        (max_len >= 1, f"max_len must be >= 1, got {max_len}"),
        (
            lq + max_len <= txt_len,
            f"question tokens ({lq}) + max_len ({max_len}) exceed the decoder's max_len "
            f"({txt_len}); tokenize questions shorter or lower max_len",
        ),
        (pad_id != eos_id, f"pad_id and eos_id are both {pad_id}; they must differ"),
        (
            0 <= eos_id < vocab_limit,
            f"eos_id={eos_id} is outside the vocabulary [0, {vocab_limit}) (vocab_limit included): "
            "EOS must stay emittable",
        ),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(f"prefix_lm.generate: {message}.")
    settings = (int(max_len), int(eos_id), int(pad_id), vocab_limit, bool(use_cache))
    if not isinstance(images, jax.Array) or images.dtype != jnp.float32:
        images = jnp.asarray(images, jnp.float32)
    if not isinstance(question, jax.Array):
        question = jnp.asarray(question, jnp.int32)
    out = _compiled(model, settings)(params, images, question)
    return out if keep_on_device else jax.device_get(out)


def answer_logprobs(
    model: cappa.Model,
    params: Any,
    images: Any,
    question: Any,
    answer: Any,
    pad_id: int,
    vocab_limit: int | None = None,
) -> np.ndarray:
    """Summed teacher-forced log-probs [B] of ``answer`` tokens [B, La] after the questions (the
    tests' reference for the decoder's scores; counts the answer's non-pad tokens). Like
    ``generate``'s, they are log-probs of the distribution renormalised without ``pad_id`` and the ids
    >= ``vocab_limit`` (``decode.forbid_ids``). Jitted once per model and ids."""
    key = (id(model), "answer_logprobs", int(pad_id), vocab_limit)
    if key not in _COMPILED:

        def run(params, images, question, answer):
            encoded, _ = model.apply({"params": params}, images, method=cappa.Model.encode)
            inputs = training_inputs(question, answer, pad_id)
            logits = model.apply(
                {"params": params},
                inputs["tokens"],
                encoded,
                inputs["mask"],
                method=cappa.Model.decode,
            )
            logp = jax.nn.log_softmax(decode.forbid_ids(logits, pad_id, vocab_limit))
            token = jnp.take_along_axis(logp, inputs["targets"][..., None], axis=-1)[..., 0]
            return jnp.sum(jnp.where(inputs["weights"] > 0, token, 0.0), axis=1)

        _COMPILED[key] = (model, jax.jit(run))
    return np.asarray(
        _COMPILED[key][1](
            params,
            jnp.asarray(images, jnp.float32),
            jnp.asarray(question, jnp.int32),
            jnp.asarray(answer, jnp.int32),
        )
    )

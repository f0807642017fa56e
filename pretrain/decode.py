"""Caption generation with the CapPa decoder: greedy, sampling (temperature, top-k, top-p) and beam search.

One call of ``generate`` runs ONE jitted function: encode the images, prefill the decoder cache with the
start token, then a ``lax.while_loop`` of one-token steps that stops as soon as every sequence has
ended. Compiled functions are kept per (model, static settings), so repeated calls with batches of the
same shape never recompile.

Conventions (those of transfer/tokenizer.py):

* ``tokens`` [B, R, max_len] are ``pieces..., EOS, pad...``; a sequence that reaches ``max_len``
  without EOS ends there (truncated) and is a valid result too.
* ``lengths`` count the tokens up to and including EOS; ``logprobs`` are the sum of the token
  log-probabilities over those tokens under the distribution decoding chooses from (temperature and
  top-k/p change what is drawn, not how it is scored; see ``forbid_ids`` for the ids removed).
* Decoding never emits the pad id (pad is filler after EOS, never content; with the default pad 0 it is
  also the decoder's start token) nor an id at or above ``vocab_limit``: ``forbid_ids`` sets their
  logits to -inf before every method chooses, so the log-probs are those of the model's distribution
  renormalised over the other ids, and beam search ranks by them. [MASK] (id ``vocab_size``, an extra
  input embedding row of pretrain/decoder.py) has no logit at all: the head has ``vocab_size`` outputs.
* Beam search ranks finished hypotheses by ``logprob / ((5 + length) / 6) ** length_penalty``
  (the GNMT length penalty; ``length_penalty=0`` ranks by raw log-probability) and returns them in
  ``scores``. A returned score of -inf marks a placeholder (fewer than ``num_return_sequences``
  emittable sequences exist): its tokens mean nothing.

``use_cache=False`` recomputes the whole teacher-forced decoder at every step: the slow reference
that the tests and the benchmark compare the cache against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrain import cappa

METHODS = ("greedy", "sample", "beam")
_COMPILED: dict[tuple[int, Any], tuple[Any, Any]] = {}  # (id(model), settings) -> (model, fn)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static arguments of one compiled decoder (hashable: the key of the compile cache).

    Float knobs (temperature, top_p, length_penalty) are traced arguments: changing them never
    recompiles.
    """

    method: str
    max_len: int
    eos_id: int
    pad_id: int
    top_k: int
    nucleus: bool  # top_p < 1; the values of top_p, temperature and length_penalty are traced.
    beam_size: int
    num_return_sequences: int
    return_embeddings: bool
    use_cache: bool
    vocab_limit: int | None


def length_penalty_factor(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT's ``((5 + length) / 6) ** alpha``: beam scores are log-probabilities divided by it."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def forbid_ids(logits: jax.Array, pad_id: int, vocab_limit: int | None = None) -> jax.Array:
    """``logits`` [..., V] with -inf at the ids decoding must never emit: ``pad_id`` and every id
    >= ``vocab_limit`` (a tokenizer smaller than the model's vocabulary; ``generate`` caps it at the
    model's ``vocab_size``, the [MASK] id, so a [MASK] logit would be removed too if a head had one).

    The one place every decoding method (greedy, sampling, beam search, prefix decoding) goes through;
    a log-softmax of the result is the model's distribution renormalised over the allowed ids (EOS is
    always allowed: it differs from pad and lies below the limit, so no row is all -inf).
    """
    ids = jnp.arange(logits.shape[-1])
    allowed = ids != pad_id
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        allowed &= ids < vocab_limit
    return jnp.where(allowed, logits, -jnp.inf)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
    """Sets logits outside the top-k and outside the nucleus (top-p) to -inf; 0 / 1.0 = off.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    most likely token is always in it); tokens tied with its least likely member are kept too.
    ``top_k`` is static (a shape); ``top_p`` may be traced, the filter is skipped only for a Python 1.0.
    """
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not (isinstance(top_p, float | int) and top_p >= 1.0):
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


# --------------------------------------------------------------------------------------- the decoder steps
def _prefill(model, params, encoded, s: Settings):
    """Logits [R,V] of the first position, and the state that later steps need."""
    rows = encoded.shape[0]
    if s.use_cache:
        start = jnp.full((rows, 1), cappa.START_ID, jnp.int32)
        logits, variables = model.apply(
            {"params": params},
            start,
            encoded,
            decode=True,
            method=cappa.Model.decode,
            mutable=["cache"],
        )
        return logits[:, 0], variables["cache"]
    tokens = jnp.full((rows, s.max_len), s.pad_id, jnp.int32)
    return _recompute(model, params, encoded, tokens, 0), encoded


def _recompute(model, params, encoded, tokens, position):
    """The reference: the full teacher-forced decoder on ``tokens``, logits at ``position``."""
    inputs, mask = cappa.shift_right(tokens), cappa.causal_mask(tokens.shape[1])
    logits = model.apply({"params": params}, inputs, encoded, mask, method=cappa.Model.decode)
    return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)


def _step(model, params, state, tokens, t, s: Settings):
    """Logits [R,V] of position t + 1, given ``tokens[:, :t + 1]``; and the new state."""
    if s.use_cache:
        last = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
        logits, variables = model.apply(
            {"params": params, "cache": state},
            last,
            None,
            decode=True,
            method=cappa.Model.decode,
            mutable=["cache"],
        )
        return logits[:, 0], variables["cache"]
    return _recompute(model, params, state, tokens, t + 1), state


def _take_rows(tree: Any, rows: jax.Array) -> Any:
    """Every leaf (cache or encoder tokens) has the batch on axis 0: reorder or expand it."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


def _reorder_beams(state: Any, rows: jax.Array) -> Any:
    """Gathers the surviving beams' self-attention caches. ``rows`` never leave their image, and the
    cross-attention keys/values, the position index and the encoder tokens are the same for all beams
    of an image, so those leaves stay put (a third of a step's memory traffic saved)."""

    def take(path, x):
        names = [getattr(k, "key", None) for k in path]
        return jnp.take(x, rows, axis=0) if "self_attn" in names else x

    return jax.tree_util.tree_map_with_path(take, state)


# ------------------------------------------------------------------------------------- greedy and sampling
def _sequential(model, params, encoded, rng, knobs: dict, s: Settings) -> dict:
    """Greedy or sampled decoding of every row of ``encoded``; stops when all rows have ended."""
    rows = encoded.shape[0]
    logits, state = _prefill(model, params, encoded, s)
    carry = dict(
        t=jnp.int32(0),
        tokens=jnp.full((rows, s.max_len), s.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows,), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        done=jnp.zeros((rows,), bool),
        logits=logits,
        state=state,
    )

    def choose(c: dict) -> dict:
        t, done, logits = c["t"], c["done"], forbid_ids(c["logits"], s.pad_id, s.vocab_limit)
        if s.method == "greedy":
            tok = jnp.argmax(logits, axis=-1)
        else:
            top_p = knobs["top_p"] if s.nucleus else 1.0
            drawn = filter_logits(logits / knobs["temperature"], s.top_k, top_p)
            tok = jax.random.categorical(jax.random.fold_in(rng, t), drawn, axis=-1)
        tok = tok.astype(jnp.int32)
        tok_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, s.pad_id, tok)
        return dict(
            c,
            tokens=jax.lax.dynamic_update_slice_in_dim(c["tokens"], tok[:, None], t, axis=1),
            logprobs=c["logprobs"] + jnp.where(done, 0.0, tok_logp),
            lengths=jnp.where(done, c["lengths"], t + 1),
            done=done | (tok == s.eos_id),
        )

    def body(c: dict) -> dict:
        c = choose(c)
        logits, state = _step(model, params, c["state"], c["tokens"], c["t"], s)
        return dict(c, t=c["t"] + 1, logits=logits, state=state)

    def cond(c: dict) -> jax.Array:
        return (c["t"] < s.max_len - 1) & ~jnp.all(c["done"])

    c = choose(jax.lax.while_loop(cond, body, carry))
    return {k: c[k] for k in ("tokens", "logprobs", "lengths")}


# --------------------------------------------------------------------------------------------- beam search
def _beam(model, params, encoded, knobs: dict, s: Settings) -> dict:
    """Beam search per image; finished hypotheses compete by length-penalised score."""
    b, k, n_ret, length = encoded.shape[0], s.beam_size, s.num_return_sequences, s.max_len
    logits, state = _prefill(model, params, encoded, s)
    expand = jnp.repeat(jnp.arange(b), k)
    neg = jnp.full((b, k), -jnp.inf, jnp.float32)
    carry = dict(
        t=jnp.int32(0),
        alive_seq=jnp.full((b, k, length), s.pad_id, jnp.int32),
        alive_lp=neg.at[:, 0].set(0.0),  # k copies of one start: only the first may expand.
        fin_seq=jnp.full((b, k, length), s.pad_id, jnp.int32),
        fin_score=neg,
        fin_lp=neg,
        fin_len=jnp.zeros((b, k), jnp.int32),
        logits=logits[expand],
        state=_take_rows(state, expand),
    )

    def select(c: dict) -> tuple[dict, jax.Array]:
        t = c["t"]
        logits = forbid_ids(c["logits"], s.pad_id, s.vocab_limit)
        logp = jax.nn.log_softmax(logits).reshape(b, k, -1)
        vocab = logp.shape[-1]
        cand = (c["alive_lp"][..., None] + logp).reshape(b, k * vocab)
        top_lp, idx = jax.lax.top_k(cand, min(2 * k, k * vocab))  # >= k of them do not end here.
        origin, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(c["alive_seq"], origin[..., None], axis=1)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[..., None], t, axis=2)
        is_eos = tok == s.eos_id
        ends = is_eos | (t == length - 1)  # At the last position every hypothesis ends.
        score = jnp.where(
            ends, top_lp / length_penalty_factor(t + 1, knobs["length_penalty"]), -jnp.inf
        )
        pool = lambda old, new: jnp.concatenate([old, new], axis=1)
        fin_score, keep = jax.lax.top_k(pool(c["fin_score"], score), k)
        pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), 1)
        alive_lp, live = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_lp), k)
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(origin, live, 1)).reshape(-1)
        c = dict(
            c,
            fin_score=fin_score,
            fin_seq=pick(pool(c["fin_seq"], seqs)),
            fin_lp=pick(pool(c["fin_lp"], top_lp)),
            fin_len=pick(pool(c["fin_len"], jnp.full_like(tok, t + 1))),
            alive_lp=alive_lp,
            alive_seq=jnp.take_along_axis(seqs, live[..., None], axis=1),
        )
        return c, rows

    def body(c: dict) -> dict:
        c, rows = select(c)
        tokens = c["alive_seq"].reshape(b * k, length)
        logits, state = _step(model, params, _reorder_beams(c["state"], rows), tokens, c["t"], s)
        return dict(c, t=c["t"] + 1, logits=logits, state=state)

    def cond(c: dict) -> jax.Array:
        # No alive hypothesis can still beat the n_ret-th finished one: log-probs only fall, and the
        # penalty factor (alpha >= 0) is largest at the maximal length.
        best_alive = jnp.max(c["alive_lp"], axis=1) / length_penalty_factor(
            length, knobs["length_penalty"]
        )
        settled = c["fin_score"][:, n_ret - 1] >= best_alive
        return (c["t"] < length - 1) & ~jnp.all(settled)

    c, _ = select(jax.lax.while_loop(cond, body, carry))
    return {
        "tokens": c["fin_seq"][:, :n_ret],
        "logprobs": c["fin_lp"][:, :n_ret],
        "lengths": c["fin_len"][:, :n_ret],
        "scores": c["fin_score"][:, :n_ret],
    }


# ---------------------------------------------------------------------------------------------- public API
def _decode_fn(model, s: Settings):
    def run(params, images, rng, knobs):
        encoded, _ = model.apply({"params": params}, images, method=cappa.Model.encode)
        b, r = images.shape[0], s.num_return_sequences
        if s.method == "beam":
            out = _beam(model, params, encoded, knobs, s)
        else:
            out = _sequential(model, params, jnp.repeat(encoded, r, axis=0), rng, knobs, s)
            out = {name: x.reshape(b, r, *x.shape[1:]) for name, x in out.items()}
        if s.return_embeddings:
            out["encoded"] = encoded
        return out

    return jax.jit(run)


def compiled(model: cappa.Model, settings: Settings) -> Any:
    """The jitted ``(params, images, rng, knobs) -> outputs`` of these settings (built once per model).

    ``knobs``: float32 scalars ``temperature``, ``top_p``, ``length_penalty``.
    """
    key = (id(model), settings)
    if key not in _COMPILED:  # The entry holds the model, so its id is never reused by another.
        _COMPILED[key] = (model, _decode_fn(model, settings))
    return _COMPILED[key][1]


def _check(model: cappa.Model, images: Any, s: Settings, knobs: dict, rng: Any) -> None:
    txt_len, vocab = int(model.txt_kw["max_len"]), int(model.txt_kw["vocab_size"])
    problems = [
        (s.method in METHODS, f"method={s.method!r}; use one of {METHODS}"),
        (np.ndim(images) == 4, f"images must be [B, H, W, 3], got shape {np.shape(images)}"),
        (
            1 <= s.max_len <= txt_len,
            f"max_len={s.max_len} must be in [1, model.txt.max_len={txt_len}]",
        ),
        (
            0 <= s.eos_id < min(vocab, s.vocab_limit or vocab),
            f"eos_id={s.eos_id} is outside the vocabulary [0, {min(vocab, s.vocab_limit or vocab)})"
            " (vocab_limit included): EOS must stay emittable",
        ),
        (s.pad_id != s.eos_id, f"pad_id and eos_id are both {s.pad_id}; they must differ"),
        (
            knobs["temperature"] > 0,
            f"temperature must be > 0 (greedy = 0), got {knobs['temperature']}",
        ),
        (s.top_k >= 0, f"top_k must be >= 0 (0 = off), got {s.top_k}"),
        (0 < knobs["top_p"] <= 1, f"top_p must be in (0, 1] (1 = off), got {knobs['top_p']}"),
        (s.beam_size >= 1, f"beam_size must be >= 1, got {s.beam_size}"),
        (
            knobs["length_penalty"] >= 0,
            f"length_penalty must be >= 0, got {knobs['length_penalty']}",
        ),
        (
            s.num_return_sequences >= 1,
            f"num_return_sequences must be >= 1, got {s.num_return_sequences}",
        ),
        (
            s.method != "greedy" or s.num_return_sequences == 1,
            "greedy decoding returns one sequence per image; use method='beam' or 'sample' for "
            "num_return_sequences > 1",
        ),
        (
            s.method != "beam" or s.num_return_sequences <= s.beam_size,
            f"num_return_sequences={s.num_return_sequences} > beam_size={s.beam_size}",
        ),
        (s.method != "sample" or rng is not None, "method='sample' needs an rng (jax.random.key)"),
        (
            s.vocab_limit is None or s.vocab_limit > 0,
            f"vocab_limit must be > 0, got {s.vocab_limit}",
        ),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(f"generate: {message}.")


def generate(
    model: cappa.Model,
    params: Any,
    images: Any,
    *,
    max_len: int,
    eos_id: int,
    method: str = "greedy",
    pad_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 0.0,
    num_return_sequences: int = 1,
    rng: jax.Array | None = None,
    return_embeddings: bool = False,
    use_cache: bool = True,
    vocab_limit: int | None = None,
    keep_on_device: bool = False,
) -> dict[str, np.ndarray]:
    """Captions of ``images`` [B,H,W,3] (in [-1, 1]) by ``method``; see the module docstring.

    Returns numpy ``tokens`` [B,R,max_len], ``logprobs`` [B,R], ``lengths`` [B,R] (R =
    ``num_return_sequences``, best first for beam search, which also returns ``scores`` [B,R]) and
    ``encoded`` [B,N,E] (the image tower's tokens) if ``return_embeddings``. ``pad_id`` and
    ``eos_id`` are the tokenizer's (``captions`` fills them in); ``pad_id`` is never generated as
    content. ``vocab_limit`` keeps generation to ids below it (a tokenizer smaller than the model's
    vocabulary); it is capped at the model's ``vocab_size``. Log-probs are those of the model's
    distribution renormalised over the emittable ids (``forbid_ids``). ``keep_on_device`` returns the
    jax arrays as computed (``images`` may be a global array sharded over a mesh: the evaluators' path).
    """
    vocab = int(model.txt_kw["vocab_size"])  # also the [MASK] id: never emittable.
    settings = Settings(
        method,
        int(max_len),
        int(eos_id),
        int(pad_id),
        int(top_k),
        float(top_p) < 1.0,
        int(beam_size),
        int(num_return_sequences),
        bool(return_embeddings),
        bool(use_cache),
        vocab if vocab_limit is None else min(int(vocab_limit), vocab),
    )
    knobs = dict(
        temperature=float(temperature), top_p=float(top_p), length_penalty=float(length_penalty)
    )
    _check(model, images, settings, knobs, rng)
    rng = jax.random.key(0) if rng is None else rng
    knobs = {k: jnp.float32(v) for k, v in knobs.items()}
    if not isinstance(images, jax.Array) or images.dtype != jnp.float32:
        images = jnp.asarray(images, jnp.float32)
    out = compiled(model, settings)(params, images, rng, knobs)
    return out if keep_on_device else jax.device_get(out)


def captions(
    model: cappa.Model, params: Any, images: Any, tokenizer: Any, **kwargs: Any
) -> dict[str, Any]:
    """``generate`` with the tokenizer's EOS/pad ids, plus ``text``: B lists of R strings."""
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    kwargs.setdefault("pad_id", tokenizer.pad_id)
    if tokenizer.vocab_size < int(model.txt_kw["vocab_size"]):
        kwargs.setdefault("vocab_limit", tokenizer.vocab_size)
    out = generate(model, params, images, **kwargs)
    out["text"] = [tokenizer.decode(rows) for rows in out["tokens"]]
    return out


def teacher_forced_logits(model: cappa.Model, params: Any, images: Any, tokens: Any) -> jax.Array:
    """Cap-branch logits [N,L,V] of token rows [N,L] (one image per row), jitted once per model."""
    key = (id(model), "teacher_forced")
    if key not in _COMPILED:

        def run(params, images, tokens):
            mask = cappa.causal_mask(tokens.shape[1])
            return model.apply({"params": params}, images, cappa.shift_right(tokens), mask)[0]

        _COMPILED[key] = (model, jax.jit(run))
    return _COMPILED[key][1](
        params, jnp.asarray(images, jnp.float32), jnp.asarray(tokens, jnp.int32)
    )


def reference_logprobs(
    model: cappa.Model,
    params: Any,
    images: Any,
    tokens: Sequence | np.ndarray,
    eos_id: int,
    pad_id: int | None = None,
    vocab_limit: int | None = None,
) -> np.ndarray:
    """Summed teacher-forced log-probs [N] of token rows [N,L] (up to and including the first EOS).

    ``images`` has one image per row. The reference implementation the tests check ``generate`` against
    (full recomputation, no KV cache; nothing else calls it). With ``pad_id`` (and ``vocab_limit``) the
    log-probs are those ``generate`` reports: the model's distribution renormalised over the ids decoding
    may emit (``forbid_ids``); without, the model's own.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    logits = teacher_forced_logits(model, params, images, tokens)
    if pad_id is not None:
        logits = forbid_ids(logits, pad_id, vocab_limit)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
    is_eos = tokens == eos_id
    valid = jnp.cumsum(is_eos, axis=1) - is_eos == 0  # Positions up to the first EOS.
    return np.asarray(jnp.sum(jnp.where(valid, logp, 0.0), axis=1))

"""Decoding (pretrain/decode.py) against references: the uncached decoder, brute-force enumeration of
every sequence, numpy nucleus sets, a numpy step-by-step greedy decoder, Model.encode; pad is never
emitted by any method (prefix decoding included) even when the head prefers it; and `cappa caption` end
to end on a trained tiny run."""

import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pretrain import cappa, caption, decode, decoder, prefix_lm, runs

VOCAB, EOS, PAD, MAX_LEN = 5, 1, 0, 4


def random_params(model, images, tokens, seed: int) -> dict:
    """Random parameters of the right shapes without compiling `init` (seconds saved per model)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        std = {"scale": 0.0, "bias": 0.1, "embedding": 1.0, "pos_embedding": 0.2}.get(
            name, 32**-0.5
        )
        if path[-2].key == "head":
            std = 0.5  # The real init is zero: constant logits would make every test trivial.
        value = rng.normal(1.0 if name == "scale" else 0.0, std or 1e-9, x.shape)
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.cache  # One model object per setting: its compiled decoders are shared by all tests.
def tiny_model(scan: bool, posemb: str, seed: int = 0):
    """A random CapPa model (vocab 5, width 32); the zero-initialised head gets noise so the logits vary.

    The EOS bias is set so that EOS is the first token for half of the images: rows that stop at once
    sit next to rows that run to max_len (or stop later).
    """
    cfg = dict(
        dtype="float32",
        img=dict(cappa.MODEL_DEFAULTS["img"], width=32, depth=1, num_heads=2, patch_size=8),
        txt=dict(
            cappa.MODEL_DEFAULTS["txt"],
            vocab_size=VOCAB,
            depth=2,
            max_len=6,
            posemb=posemb,
            scan=scan,
        ),
    )
    model = cappa.Model(**cappa.model_kwargs(cfg))
    images = jax.random.normal(jax.random.key(seed + 1), (6, 16, 16, 3))
    start = jnp.zeros((len(images), 1), jnp.int32)
    params = random_params(model, images[:1], start[:1], seed)
    head = params["txt"]["head"]
    first = np.asarray(decode.teacher_forced_logits(model, params, images, start)[:, 0])
    margin = np.delete(first, [EOS, PAD], axis=1).max(1) - first[:, EOS]  # pad is never chosen
    head["bias"] = head["bias"].at[EOS].set(np.median(margin))
    return model, params, np.asarray(images)


COMBOS = [(False, "learn"), (True, "rope"), (False, "rope"), (True, "learn")]


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"scan={c[0]}-{c[1]}")
def combo(request):
    return tiny_model(*request.param)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(*COMBOS[0])


def reference_logprobs(model, params, images, tokens):
    """Teacher-forced summed log-probs of [B, R, L] tokens (images [B, ...]), pad excluded and the
    rest renormalised: the distribution that decoding chooses from."""
    b, r, length = tokens.shape
    flat_images = np.repeat(images, r, axis=0)
    return decode.reference_logprobs(
        model, params, flat_images, tokens.reshape(b * r, length), EOS, pad_id=PAD
    ).reshape(b, r)


def with_pad_bias(params, value: float) -> dict:
    """A copy of ``params`` whose head gives pad the bias ``value`` (+50: pad is everyone's argmax)."""
    params = jax.tree.map(lambda x: x, params)
    params["txt"]["head"]["bias"] = params["txt"]["head"]["bias"].at[PAD].set(value)
    return params


def check_layout(tokens, lengths):
    """`tokens..., EOS, pad...` with EOS exactly at lengths - 1, or max_len tokens without EOS."""
    for row, n in zip(tokens.reshape(-1, MAX_LEN), lengths.reshape(-1), strict=True):
        assert (row[n:] == PAD).all() and (row[: n - 1] != EOS).all()
        assert n == MAX_LEN or row[n - 1] == EOS


def test_cached_greedy_equals_uncached(combo):
    model, params, images = combo
    kw = dict(max_len=MAX_LEN, eos_id=EOS, pad_id=PAD)
    cached = decode.generate(model, params, images, **kw)
    slow = decode.generate(model, params, images, use_cache=False, **kw)
    np.testing.assert_array_equal(cached["tokens"], slow["tokens"])
    np.testing.assert_array_equal(cached["lengths"], slow["lengths"])
    np.testing.assert_allclose(cached["logprobs"], slow["logprobs"], rtol=1e-5, atol=1e-5)
    ref = reference_logprobs(model, params, images, cached["tokens"])
    np.testing.assert_allclose(cached["logprobs"], ref, rtol=1e-5, atol=1e-5)
    check_layout(cached["tokens"], cached["lengths"])
    assert (cached["lengths"] == 1).any() and (cached["lengths"] > 1).any()


def test_cached_beam_equals_uncached():
    """On the scanned decoder (cache leaves [B, depth, ...]); the exhaustive test covers the looped one."""
    model, params, images = tiny_model(True, "rope")
    kw = dict(method="beam", beam_size=3, num_return_sequences=2, max_len=MAX_LEN, eos_id=EOS)
    cached = decode.generate(model, params, images, length_penalty=0.6, **kw)
    slow = decode.generate(model, params, images, length_penalty=0.6, use_cache=False, **kw)
    np.testing.assert_array_equal(cached["tokens"], slow["tokens"])
    np.testing.assert_allclose(cached["scores"], slow["scores"], rtol=1e-5, atol=1e-5)


def all_sequences(with_pad: bool = False):
    """Every decodable sequence: content tokens then EOS (padded), or max_len content tokens. Content
    is every id but EOS and pad (``with_pad``: pad too, the unrestricted decoder of old)."""
    others = [i for i in range(VOCAB) if i != EOS and (with_pad or i != PAD)]
    out = []
    for n in range(1, MAX_LEN + 1):
        for prefix in itertools.product(others, repeat=n - 1):
            out.append(list(prefix) + [EOS] + [PAD] * (MAX_LEN - n))
    out += [list(p) for p in itertools.product(others, repeat=MAX_LEN)]
    return np.asarray(out, np.int32)


@pytest.mark.parametrize("pad_bias", [None, 50.0, -30.0], ids=["random", "pad_first", "pad_last"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_full_beam_finds_the_exhaustive_best(tiny, alpha, pad_bias):
    """Against every sequence without pad as content, scored by the renormalised distribution; on the
    model that ranks pad last, against every sequence WITH pad content scored by the model's own
    distribution (the unrestricted search of old): the ban changes nothing where pad is never wanted."""
    model, params, images = tiny
    if pad_bias is not None:
        params = with_pad_bias(params, pad_bias)
    images = images[:2]
    unrestricted = pad_bias is not None and pad_bias < 0
    seqs = all_sequences(with_pad=unrestricted)
    lengths = np.where((seqs == EOS).any(1), (seqs == EOS).argmax(1) + 1, MAX_LEN)
    beam = (VOCAB - 1) ** (MAX_LEN - 1)  # Every alive prefix fits: beam search is exact.
    out = decode.generate(
        model,
        params,
        images,
        method="beam",
        beam_size=beam,
        num_return_sequences=3,
        length_penalty=alpha,
        max_len=MAX_LEN,
        eos_id=EOS,
        pad_id=PAD,
    )
    for i, image in enumerate(images):
        logp = decode.reference_logprobs(
            model,
            params,
            np.repeat(image[None], len(seqs), 0),
            seqs,
            EOS,
            pad_id=None if unrestricted else PAD,
        )
        scores = logp / ((5.0 + lengths) / 6.0) ** alpha
        best = np.argsort(-scores)[:3]
        np.testing.assert_array_equal(out["tokens"][i], seqs[best])
        np.testing.assert_allclose(out["scores"][i], scores[best], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["logprobs"][i], logp[best], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["lengths"][i], lengths[best])


def test_top_k_1_sampling_equals_greedy(tiny):
    model, params, images = tiny
    kw = dict(max_len=MAX_LEN, eos_id=EOS)
    greedy = decode.generate(model, params, images, **kw)
    sampled = decode.generate(
        model,
        params,
        images,
        method="sample",
        top_k=1,
        temperature=0.7,
        num_return_sequences=2,
        rng=jax.random.key(5),
        **kw,
    )
    for r in range(2):
        np.testing.assert_array_equal(sampled["tokens"][:, r], greedy["tokens"][:, 0])
        np.testing.assert_allclose(sampled["logprobs"][:, r], greedy["logprobs"][:, 0], rtol=1e-5)


def nucleus(logits: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p (numpy reference)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < top_p].tolist())


def test_sampling_is_reproducible_and_stays_in_the_nucleus(tiny):
    model, params, images = tiny
    kw = dict(
        method="sample",
        top_p=0.8,
        temperature=2.0,
        num_return_sequences=4,
        max_len=MAX_LEN,
        eos_id=EOS,
    )
    a = decode.generate(model, params, images, rng=jax.random.key(1), **kw)
    b = decode.generate(model, params, images, rng=jax.random.key(1), **kw)
    c = decode.generate(model, params, images, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert (a["tokens"] != c["tokens"]).any()
    check_layout(a["tokens"], a["lengths"])
    assert ((a["lengths"] > 1) & (a["lengths"] < MAX_LEN)).any()  # EOS mid-sequence too.
    tokens = a["tokens"].reshape(-1, MAX_LEN)
    logits = decode.teacher_forced_logits(model, params, np.repeat(images, 4, 0), tokens)
    logits = np.asarray(logits) / 2.0
    logits[..., PAD] = -np.inf  # Pad is never drawn: the nucleus is over the other ids.
    restricted = 0
    for row, n, row_logits in zip(tokens, a["lengths"].reshape(-1), logits, strict=True):
        for t in range(n):
            allowed = nucleus(row_logits[t], 0.8)
            assert row[t] in allowed
            restricted += len(allowed) < VOCAB - 1
    assert restricted > 10  # The filter really excluded tokens (else this test could not fail).
    ref = reference_logprobs(model, params, images, a["tokens"])
    np.testing.assert_allclose(a["logprobs"], ref, rtol=1e-5, atol=1e-5)


def test_filter_logits_matches_numpy():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (50, 7)))
    out = np.asarray(jax.jit(decode.filter_logits, static_argnums=(1, 2))(logits, 3, 0.7))
    for row, filt in zip(logits, out, strict=True):
        top3 = set(np.argsort(-row)[:3].tolist())
        masked = np.where(np.isin(np.arange(7), list(top3)), row, -np.inf)
        assert set(np.flatnonzero(np.isfinite(filt)).tolist()) == nucleus(masked, 0.7)


def test_return_embeddings_equal_encode(tiny):
    model, params, images = tiny
    out = decode.generate(
        model, params, images, max_len=MAX_LEN, eos_id=EOS, return_embeddings=True
    )
    encoded, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=cappa.Model.encode))(
        params, images
    )
    np.testing.assert_allclose(out["encoded"], encoded, rtol=1e-5, atol=1e-6)


def test_early_stop_when_every_caption_ended(tiny):
    model, params, images = tiny
    params = jax.tree.map(lambda x: x, params)
    params["txt"]["head"]["bias"] = params["txt"]["head"]["bias"].at[EOS].set(100.0)
    out = decode.generate(model, params, images, max_len=MAX_LEN, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(
        out["tokens"][:, 0], [[EOS] + [PAD] * (MAX_LEN - 1)] * len(images)
    )
    np.testing.assert_array_equal(out["lengths"], 1)
    np.testing.assert_allclose(out["logprobs"], 0.0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="beams"), "method="),
        (dict(max_len=7), "max_len=7"),
        (dict(method="beam", beam_size=2, num_return_sequences=3), "num_return_sequences=3"),
        (dict(num_return_sequences=2), "greedy decoding returns one"),
        (dict(method="sample"), "needs an rng"),
        (dict(top_p=0.0), "top_p"),
        (dict(eos_id=9), "eos_id=9"),
    ],
)
def test_bad_arguments_fail_clearly(tiny, kwargs, match):
    model, params, images = tiny
    with pytest.raises(ValueError, match=match):
        decode.generate(model, params, images, **{"max_len": MAX_LEN, "eos_id": EOS, **kwargs})


# ------------------------------------------------------------------------------- pad and [MASK] never emitted
def numpy_greedy(model, params, images, banned):
    """Step-by-step greedy in numpy on the teacher-forced logits, ``banned`` ids removed first."""
    b = len(images)
    tokens = np.full((b, MAX_LEN), PAD, np.int32)
    logprobs, lengths, done = np.zeros(b), np.zeros(b, np.int32), np.zeros(b, bool)
    for t in range(MAX_LEN):
        logits = np.asarray(decode.teacher_forced_logits(model, params, images, tokens), np.float64)
        logits = logits[:, t]
        logits[:, banned] = -np.inf
        top = logits.max(1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
        for i, tok in enumerate(logp.argmax(1)):
            if not done[i]:
                tokens[i, t], lengths[i], done[i] = tok, t + 1, tok == EOS
                logprobs[i] += logp[i, tok]
    return tokens, logprobs, lengths


def test_mask_id_has_no_logit_and_forbid_ids_removes_pad_and_the_limit(tiny):
    """[MASK] (id vocab_size) is an input embedding row only: the head has vocab_size outputs, so no
    method can choose it. ``forbid_ids`` would remove it anyway (generate caps vocab_limit there)."""
    model, params, images = tiny
    logits = decode.teacher_forced_logits(model, params, images, np.zeros((6, 1), np.int32))
    assert decoder.TextDecoder(vocab_size=VOCAB).mask_id == VOCAB == logits.shape[-1]
    wide = np.asarray(
        jax.random.normal(jax.random.key(0), (3, VOCAB + 1))
    )  # a head with a MASK row
    out = np.asarray(decode.forbid_ids(jnp.asarray(wide), PAD, VOCAB))
    assert np.isneginf(out[:, [PAD, VOCAB]]).all()
    keep = [i for i in range(VOCAB) if i != PAD]
    np.testing.assert_array_equal(out[:, keep], wide[:, keep])
    np.testing.assert_array_equal(
        np.asarray(decode.forbid_ids(jnp.asarray(wide), 3))[:, 0], wide[:, 0]
    )


def test_greedy_matches_numpy_and_never_emits_pad(tiny):
    """On the model that prefers pad everywhere, greedy is the numpy greedy without pad; on the model
    that ranks pad last, it is the numpy greedy WITH pad allowed (the old behaviour, unchanged)."""
    model, params, images = tiny
    first = lambda p: np.asarray(decode.teacher_forced_logits(model, p, images, np.zeros((6, 1))))
    pad_first, pad_last = with_pad_bias(params, 50.0), with_pad_bias(params, -30.0)
    assert (first(pad_first)[:, 0].argmax(-1) == PAD).all()  # Unmasked greedy would emit only pad.
    kw = dict(max_len=MAX_LEN, eos_id=EOS, pad_id=PAD)
    for p, banned in [(pad_first, [PAD]), (params, [PAD]), (pad_last, [])]:
        out = decode.generate(model, p, images, **kw)
        tokens, logprobs, lengths = numpy_greedy(model, p, images, banned)
        np.testing.assert_array_equal(out["tokens"][:, 0], tokens)
        np.testing.assert_array_equal(out["lengths"][:, 0], lengths)
        np.testing.assert_allclose(out["logprobs"][:, 0], logprobs, rtol=1e-5, atol=1e-5)
        check_layout(out["tokens"], out["lengths"])
        assert (out["lengths"] > 1).any()


DECODERS = {  # The settings of the tests above (compiled already), and one with both sampling filters.
    "greedy": dict(),
    "sample_top_p": dict(method="sample", top_p=0.8, temperature=2.0, num_return_sequences=4),
    "sample_top_k_1": dict(method="sample", top_k=1, temperature=0.7, num_return_sequences=2),
    "sample_top_k_top_p": dict(
        method="sample", top_k=3, top_p=0.9, temperature=1.5, num_return_sequences=4
    ),
    "beam": dict(method="beam", beam_size=3, num_return_sequences=2, length_penalty=0.6),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_no_method_emits_pad_even_when_the_head_prefers_it(tiny, name):
    """With pad the argmax everywhere (bias +50), nothing emits it as content, and the results are
    exactly those of the model that ranks pad last (bias -30): pad's logit no longer matters at all.
    Log-probs are those of the renormalised distribution (the teacher-forced reference)."""
    model, params, images = tiny_model(True, "rope") if name == "beam" else tiny
    pad_first, pad_last = with_pad_bias(params, 50.0), with_pad_bias(params, -30.0)
    kw = dict(max_len=MAX_LEN, eos_id=EOS, pad_id=PAD, **DECODERS[name])
    seeds = range(3) if kw.get("method") == "sample" else [0]
    for seed in seeds:
        rng = jax.random.key(seed)
        out = decode.generate(model, pad_first, images, rng=rng, **kw)
        same = decode.generate(model, pad_last, images, rng=rng, **kw)
        content = np.arange(MAX_LEN) < out["lengths"][..., None]
        assert not (out["tokens"][content] == PAD).any()
        assert (out["tokens"] < VOCAB).all()
        check_layout(out["tokens"], out["lengths"])
        for key in out:
            np.testing.assert_array_equal(out[key], same[key])
        ref = reference_logprobs(model, pad_first, images, out["tokens"])
        np.testing.assert_allclose(out["logprobs"], ref, rtol=1e-5, atol=1e-5)


def test_prefix_decoding_never_emits_pad(tiny):
    model, params, images = tiny
    question = np.asarray(
        [[2, 1, 0], [3, 4, 1], [1, 0, 0], [4, 1, 0], [2, 3, 1], [3, 1, 0]], np.int32
    )
    pad_first, pad_last = with_pad_bias(params, 50.0), with_pad_bias(params, -30.0)
    kw = dict(max_len=3, eos_id=EOS, pad_id=PAD)
    out = prefix_lm.generate(model, pad_first, images, question, **kw)
    same = prefix_lm.generate(model, pad_last, images, question, **kw)
    content = np.arange(3) < out["lengths"][:, None]
    assert not (out["tokens"][content] == PAD).any() and (out["tokens"] < VOCAB).all()
    for key in out:
        np.testing.assert_array_equal(out[key], same[key])
    ref = prefix_lm.answer_logprobs(model, pad_first, images, question, out["tokens"], PAD)
    np.testing.assert_allclose(out["logprobs"], ref, rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in out["tokens"]}) > 1


# ------------------------------------------------------------------------------------------- cappa caption
@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A CapPa run trained for 2 steps on scenes/tiny with its own tokenizer."""
    from transfer import tokenizer, train

    root = tmp_path_factory.mktemp("caption")
    data = {"name": "scenes/tiny", "split": "train", "data_dir": data_dir}
    tok_path = str(root / "tok.model")
    tok = tokenizer.train_tokenizer(tokenizer.captions_from_dataset(data), tok_path, 64)
    c = ml_collections.ConfigDict()
    c.task = "pretrain.cappa_task"
    c.total_steps = 2
    c.tokenizer = tok_path
    c.input = dict(
        data=data,
        batch_size=8,
        shuffle_buffer_size=16,
        pp="decode|resize(16)|value_range(-1, 1)|flatten|choice(key='captions/text', outkey='text')|"
        f"tokenize(max_len=8, model={tok_path!r}, key='text', outkey='labels')|keep('image', 'labels')",
    )
    c.model = dict(
        img=dict(width=32, depth=1, num_heads=2, patch_size=8),
        txt=dict(vocab_size=tok.vocab_size, depth=1, max_len=8),
    )
    c.ckpt_steps = 2
    c.log_training_steps = 1
    c.log_flops = False
    workdir = str(root / "run")
    config, _ = train.prepare_config(c)
    train.train(config, workdir)
    paths = []
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (20 + i, 24, 3), np.uint8)
        paths.append(str(root / f"img{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return workdir, paths


def test_caption_cli_matches_generate(trained_run, capsys):
    workdir, paths = trained_run
    assert (
        caption.main(["--checkpoint", workdir, *paths, "--method", "beam", "--beam_size", "2"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    run = runs.load_run(workdir)
    assert run.step == 2 and runs.image_size(run.params, run.config) == 16
    images = runs.load_images(paths, 16)
    ref = decode.captions(
        run.task.model, run.params, images, run.tokenizer, method="beam", beam_size=2, max_len=8
    )
    for line, path, text, logp in zip(lines, paths, ref["text"], ref["logprobs"], strict=True):
        assert line.split("\t") == [path, text[0], f"{logp[0]:.4f}"]

    assert (
        caption.main(["--checkpoint", workdir, paths[0], "--json", "--num_return_sequences", "1"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == paths[0] and len(result["captions"]) == 1
    cap = result["captions"][0]
    assert run.tokenizer.decode(cap["tokens"])[0] == cap["text"] and np.isfinite(cap["logprob"])


def test_caption_cli_bad_inputs(trained_run, tmp_path, capsys):
    workdir, paths = trained_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert caption.main(["--checkpoint", workdir, paths[0], str(bad)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    assert caption.main(["--checkpoint", str(empty), paths[0]]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert caption.main(["--checkpoint", workdir, paths[0], "--step", "7"]) == 2
    assert "available steps: [2]" in capsys.readouterr().err


def test_attention_cli_writes_overlays_for_the_greedy_caption(trained_run, tmp_path, capsys):
    from pretrain import attention

    workdir, paths = trained_run
    out_dir = str(tmp_path / "maps")
    assert attention.main(["--checkpoint", workdir, *paths[:2], "--out", out_dir]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    run = runs.load_run(workdir)
    images = runs.load_images(paths[:2], 16)
    greedy = decode.generate(
        run.task.model, run.params, images, max_len=8, eos_id=run.tokenizer.eos_id
    )
    for row, tokens in zip(rows, greedy["tokens"][:, 0], strict=True):
        n = (
            int(np.argmax(tokens == run.tokenizer.eos_id)) + 1
            if run.tokenizer.eos_id in tokens
            else 8
        )
        assert len(row["caption"].split(" ")) == n  # one panel per generated token, EOS included
        with Image.open(row["png"]) as png:
            assert png.size[0] > 200
    assert attention.main(["--checkpoint", workdir, str(tmp_path / "missing.png")]) == 2

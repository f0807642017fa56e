"""VQA: the prefix layout, mask and answer-only loss against hand-built numpy references; KV-cached prefix decoding
against full recomputation; the task through the one loop beats the majority answer, keeps a frozen tower
bit-identical, and writes predictions that re-score to the logged accuracy; `cappa vqa`."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import fit_recipe, tiny_cappa_model

from pretrain import cappa, prefix_lm
from tasks import vqa, vqa_eval, vqa_metrics, vqa_pp
from transfer import config as config_lib
from transfer import metrics, train

STEPS = 150  # enough for the tiny model to fit the split it is scored on

PAD, EOS = 0, 1
QLEN, ALEN = 16, 6
IMAGE_PP = "decode|resize(32)|value_range(-1, 1)"


# ------------------------------------------------------------------------------ layout, mask, loss
def token_rows(rng, lengths, width):
    """`pieces, EOS, pad` rows of the given non-pad lengths (pieces in [2, 7): the random model's vocab)."""
    rows = np.full((len(lengths), width), PAD, np.int32)
    for row, n in zip(rows, lengths, strict=True):
        row[: n - 1] = rng.integers(2, 7, n - 1)
        row[n - 1] = EOS
    return rows


def hand_built(question, answer):
    """Packed rows, masks, targets and weights written out per example, one position at a time."""
    b, lq = question.shape
    la = answer.shape[1]
    t = lq + la
    rows = np.full((b, t + 1), PAD, np.int32)
    mask = np.zeros((b, t, t), bool)
    weights = np.zeros((b, t), np.float32)
    for i in range(b):
        q = [x for x in question[i] if x != PAD]
        a = list(answer[i])
        seq = [cappa.START_ID] + q + a
        rows[i, : len(seq)] = seq[: t + 1]
        plen = 1 + len(q)
        n_answer = sum(x != PAD for x in a)
        for query in range(t):
            for key in range(t):
                mask[i, query, key] = key <= query or (query < plen and key < plen)
            weights[i, query] = plen <= query + 1 < plen + n_answer
    return rows, mask, weights


def test_prefix_mask_layout_and_weights_match_hand_built():
    rng = np.random.default_rng(0)
    question = token_rows(rng, [1, 3, 5, 2], 5)
    answer = token_rows(rng, [2, 1, 3, 3], 3)
    rows, mask, weights = hand_built(question, answer)
    packed, plen = prefix_lm.pack(jnp.asarray(question), jnp.asarray(answer), PAD)
    np.testing.assert_array_equal(packed, rows)
    np.testing.assert_array_equal(plen, [2, 4, 6, 3])
    inputs = prefix_lm.training_inputs(jnp.asarray(question), jnp.asarray(answer), PAD)
    np.testing.assert_array_equal(inputs["tokens"], rows[:, :-1])
    np.testing.assert_array_equal(inputs["targets"], rows[:, 1:])
    np.testing.assert_array_equal(inputs["mask"][:, 0], mask)
    np.testing.assert_array_equal(inputs["weights"], weights)
    # The targets with weight 1 are exactly each answer's tokens, EOS included.
    for i in range(len(answer)):
        got = np.asarray(inputs["targets"][i])[np.asarray(inputs["weights"][i]) > 0]
        np.testing.assert_array_equal(got, answer[i][answer[i] != PAD])


def test_answer_loss_is_the_mean_over_answer_tokens_only():
    rng = np.random.default_rng(1)
    question = token_rows(rng, [2, 4, 1], 4)
    answer = token_rows(rng, [3, 1, 2], 3)
    inputs = prefix_lm.training_inputs(jnp.asarray(question), jnp.asarray(answer), PAD)
    logits = rng.normal(size=(3, 7, 9)).astype(np.float32)
    losses, count = prefix_lm.answer_loss(jnp.asarray(logits), inputs["targets"], inputs["weights"])
    _, _, weights = hand_built(question, answer)
    targets = np.asarray(inputs["targets"])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for i in range(3):
        picked = [-logp[i, j, targets[i, j]] for j in range(7) if weights[i, j]]
        assert losses[i] == pytest.approx(np.mean(picked), rel=1e-5)
        assert count[i] == (answer[i] != PAD).sum()
    # Logits at question positions and after the answer change nothing.
    changed = np.where(weights[..., None] > 0, logits, logits + rng.normal(size=logits.shape) * 5)
    again, _ = prefix_lm.answer_loss(jnp.asarray(changed), inputs["targets"], inputs["weights"])
    np.testing.assert_allclose(again, losses, rtol=1e-6)


# ------------------------------------------------------------------------------ cached prefix decoding
@functools.cache
def random_model(scan: bool, posemb: str):
    """A random CapPa model (vocab 7) whose zero-initialised head gets noise so that answers vary."""
    cfg = dict(
        dtype="float32",
        img=dict(cappa.MODEL_DEFAULTS["img"], width=32, depth=1, num_heads=2, patch_size=8),
        txt=dict(
            cappa.MODEL_DEFAULTS["txt"], vocab_size=7, depth=2, max_len=10, posemb=posemb, scan=scan
        ),
    )
    model = cappa.Model(**cappa.model_kwargs(cfg))
    images = np.asarray(jax.random.normal(jax.random.key(1), (6, 16, 16, 3)))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1], jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(0)

    def leaf(path, x):
        name = path[-1].key
        std = 0.5 if path[-2].key == "head" else {"scale": 0.0, "embedding": 1.0}.get(name, 0.2)
        return jnp.asarray(
            rng.normal(1.0 if name == "scale" else 0.0, std or 1e-9, x.shape), x.dtype
        )

    params = jax.tree_util.tree_map_with_path(leaf, shapes["params"])
    head = params["txt"]["head"]
    head["bias"] = (
        head["bias"].at[PAD].set(-30.0).at[EOS].add(-1.5)
    )  # no pad mid-answer; longer answers
    question = token_rows(np.random.default_rng(2), [1, 2, 4, 3, 4, 2], 4)
    return model, params, images, question


@pytest.mark.parametrize("scan,posemb", [(False, "learn"), (True, "rope")])
def test_cached_prefix_greedy_equals_recomputation(scan, posemb):
    model, params, images, question = random_model(scan, posemb)
    kw = dict(max_len=5, eos_id=EOS, pad_id=PAD)
    cached = prefix_lm.generate(model, params, images, question, **kw)
    slow = prefix_lm.generate(model, params, images, question, use_cache=False, **kw)
    np.testing.assert_array_equal(cached["tokens"], slow["tokens"])
    np.testing.assert_array_equal(cached["lengths"], slow["lengths"])
    np.testing.assert_allclose(cached["logprobs"], slow["logprobs"], rtol=1e-5, atol=1e-5)
    ref = prefix_lm.answer_logprobs(model, params, images, question, cached["tokens"], PAD)
    np.testing.assert_allclose(cached["logprobs"], ref, rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in cached["tokens"]}) > 1  # not one constant answer


def test_prefix_attention_is_bidirectional_where_it_matters():
    """The test above is not vacuous: a causal-only prefix gives other first-answer logits."""
    model, params, images, question = random_model(False, "learn")
    encoded, _ = model.apply({"params": params}, images, method=cappa.Model.encode)
    rows, plen = prefix_lm.pack(jnp.asarray(question), jnp.zeros((6, 0), jnp.int32), PAD)
    last = lambda logits: np.take_along_axis(np.asarray(logits), (plen - 1)[:, None, None], 1)
    full = model.apply(
        {"params": params}, rows, encoded, prefix_lm.prefix_mask(plen, 5), method=cappa.Model.decode
    )
    causal = model.apply(
        {"params": params}, rows, encoded, cappa.causal_mask(5), method=cappa.Model.decode
    )
    long = np.asarray(plen) > 2
    assert not np.allclose(last(full)[long], last(causal)[long], atol=1e-4)


def test_generate_rejects_a_prefix_longer_than_the_decoder():
    model, params, images, question = random_model(False, "learn")
    with pytest.raises(ValueError, match="exceed the decoder's max_len"):
        prefix_lm.generate(model, params, images, question, max_len=7, eos_id=EOS)


def test_pp_ops_and_number_words():
    import tensorflow as tf

    ex = {"answers": tf.constant(["2", "two", "2", "3"]), "answer": tf.constant("2 dogs and 10")}
    assert vqa_pp.get_majority_answer()(ex)["answer"].numpy() == b"2"
    spelled = vqa_pp.get_spell_numbers()(ex)["answer"].numpy().decode()
    assert spelled == "two dogs and ten" and vqa_pp.digits_from_words(spelled) == "2 dogs and 10"
    one = vqa_pp.get_vqa_answers(key="answer", n=3)(ex)["answers"].numpy().tolist()
    assert one == [b"2 dogs and 10"] * 3
    assert vqa_pp.get_vqa_answers(n=None)(ex)["answers"].shape == (4,)


# ------------------------------------------------------------------------------ the task end to end
@pytest.fixture(scope="module")
def vqa_tokenizer(data_dir, tmp_path_factory):
    """BPE on the questions and answers of `scenes_vqa/tiny` (digits included)."""
    from transfer import tokenizer

    data = {"name": "scenes_vqa/tiny", "split": "train", "data_dir": data_dir}
    texts = [*tokenizer.captions_from_dataset(data, "question")]
    texts += [*tokenizer.captions_from_dataset(data, "answers")]
    path = str(tmp_path_factory.mktemp("vqa_tok") / "vqa.model")
    return tokenizer.train_tokenizer(texts, path, vocab_size=120, model_type="bpe")


def vqa_config(data_dir, tok, **overrides):
    c = ml_collections.ConfigDict()
    c.task = "tasks.vqa"
    c.tokenizer = tok.path
    c.question_len, c.answer_len = QLEN, ALEN
    c.pp_modules = ["tasks.vqa_pp"]
    c.input = dict(
        # The 16 questions it is scored on: a test-sized model fits them in seconds, which proves
        # training + prefix decoding + scoring end to end (generalisation is the demo's to show).
        data=dict(name="scenes_vqa/tiny", split="validation", data_dir=data_dir),
        batch_size=16,
        pp=(
            f"{IMAGE_PP}|majority_answer(key='answers', outkey='answer')"
            f"|tokenize(max_len={QLEN}, model='{tok.path}', key='question', outkey='prefix')"
            f"|tokenize(max_len={ALEN}, model='{tok.path}', key='answer', outkey='labels')"
            "|keep('image', 'prefix', 'labels')"
        ),
        shuffle_buffer_size=64,
    )
    c.model = tiny_cappa_model(tok.vocab_size, QLEN + ALEN)
    c.update(fit_recipe(STEPS, overrides.pop("schedule", None)))
    c.evals = dict(
        vqa=dict(
            type="vqa", data=dict(split="validation"), pp=IMAGE_PP, batch_size=16, num_samples=4
        ),
        val=dict(type="perplexity", data=dict(split="validation"), batch_size=16),
    )
    c.update(overrides)
    config, _ = train.prepare_config(config_lib.merge_with_defaults(c, vqa.DEFAULTS))
    return config


@pytest.fixture(scope="module")
def vqa_run(data_dir, vqa_tokenizer, tmp_path_factory):
    config = vqa_config(data_dir, vqa_tokenizer)
    workdir = str(tmp_path_factory.mktemp("vqa_run"))
    return workdir, train.train(config, workdir), config


def test_vqa_task_beats_the_majority_answer(vqa_run):
    workdir, result, _ = vqa_run
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    start, final = rows[0], result.metrics
    assert start["step"] == 0 and final["vqa/questions"] == 16
    assert final["vqa/accuracy"] > final["vqa/baseline/accuracy"] + 30
    assert final["vqa/accuracy"] > start["vqa/accuracy"] + 30
    assert final["vqa/baseline/accuracy"] == start["vqa/baseline/accuracy"]
    assert final["vqa/baseline_qtype/accuracy"] >= final["vqa/baseline/accuracy"]


def test_predictions_rescore_to_the_logged_accuracy(vqa_run):
    workdir, result, config = vqa_run
    preds = vqa_metrics.read_vqa_results(os.path.join(workdir, "vqa", f"vqa_step{STEPS}.json"))
    cfg = dict(vqa_eval.DEFAULTS)
    annotations = vqa_eval.read_annotations(dict(config.input.data, split="validation"), cfg)
    assert set(preds) == set(annotations) and len(preds) == 16
    scores = vqa_metrics.score(annotations, preds)
    assert scores["overall"] == pytest.approx(result.metrics["vqa/accuracy"], abs=1e-9)
    for name, value in scores["per_answer_type"].items():
        key = "vqa/accuracy/" + name.replace("/", "_")
        assert value == pytest.approx(result.metrics[key], abs=1e-9)
    page = open(os.path.join(workdir, "vqa", "vqa_samples.html"), encoding="utf-8").read()
    assert page.count("<img ") == 4 and " -&gt; " in page
    report = open(os.path.join(workdir, "vqa.md")).read()
    assert f"{result.metrics['vqa/accuracy']:.4f}" in report
    assert f"{result.metrics['vqa/baseline/accuracy']:.4f}" in report
    assert f"{result.metrics['val/loss']:.4f}" in report  # the collapse table: before / after


def test_majority_baseline_is_the_most_frequent_training_answer(vqa_run):
    import collections

    import tensorflow_datasets as tfds

    _, _, config = vqa_run
    ds = tfds.load("scenes_vqa/tiny", split="validation", data_dir=config.input.data.data_dir)
    counts = collections.Counter(a.decode() for ex in tfds.as_numpy(ds) for a in ex["answers"])
    overall, _ = vqa_eval.majority_answers(
        vqa_eval.read_annotations(dict(config.input.data), dict(vqa_eval.DEFAULTS))
    )
    assert counts[overall] == max(counts.values())


@pytest.fixture(scope="module")
def frozen_run(vqa_run, data_dir, vqa_tokenizer, tmp_path_factory):
    """The trained run loaded, its tower frozen, 3 steps."""
    config = vqa_config(
        data_dir,
        vqa_tokenizer,
        total_steps=3,
        ckpt_steps=3,
        model_init=vqa_run[0],
        schedule=[("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=1))],
    )
    config.evals = dict(val=dict(type="perplexity", data=dict(split="validation"), batch_size=16))
    return train.train(config, str(tmp_path_factory.mktemp("vqa_frozen")))


def test_frozen_tower_is_bit_identical(vqa_run, frozen_run):
    before, after = vqa_run[1].params, frozen_run.params
    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), before["img"], after["img"]
    )
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
        before["txt"]["head"],
        after["txt"]["head"],
    )
    assert all(jax.tree.leaves(moved))


def test_cli_answers_as_the_decoder(vqa_run, tmp_path, capsys):
    from PIL import Image

    from pretrain import runs

    workdir, result, _ = vqa_run
    path = str(tmp_path / "scene.png")
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    questions = ["how many shapes are there?", "is there a red circle?"]
    assert vqa.main(["--checkpoint", workdir, path, *questions]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    run = runs.load_run(workdir)
    image = np.repeat(runs.load_images([path], 32), 2, axis=0)
    out = prefix_lm.generate(
        run.task.model,
        run.params,
        image,
        run.tokenizer.encode(questions, QLEN),
        max_len=ALEN,
        eos_id=run.tokenizer.eos_id,
    )
    expected = [
        f"{q}\t{a.strip()}"
        for q, a in zip(questions, run.tokenizer.decode(out["tokens"]), strict=True)
    ]
    assert lines == expected
    assert vqa.main(["--checkpoint", str(tmp_path), path, "q?"]) == 2

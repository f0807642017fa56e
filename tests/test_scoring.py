"""Caption scoring vs a per-pair reference (the full model on each (image, caption) pair), chunking,
template averaging, the swap_word op, and both evaluators end to end on scenes/tiny over a 2x4 mesh."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from pretrain import cappa, scoring
from transfer import contracts, evaluators, input_pipeline, pp, pp_text, sharding, train
from transfer.datasets import render, scenes
from transfer.tokenizer import captions_from_dataset, train_tokenizer

MAX_LEN = 32  # as configs/cappa_tiny.py: long captions (a digit named first) keep their colour word
IMAGE_PP = "decode|value_range(-1, 1)"
TEMPLATES = ["a {}", "the largest shape is a {}"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    """A tiny CapPa task, a tokenizer trained on scenes/tiny captions, random params."""
    train_data = {"name": "scenes/tiny", "split": "train", "data_dir": data_dir}
    path = str(tmp_path_factory.mktemp("tok") / "scenes.model")
    tok = train_tokenizer(captions_from_dataset(train_data), path, 96, "bpe", num_threads=1)
    config = ml_collections.ConfigDict(
        dict(
            task="pretrain.cappa_task",
            tokenizer=path,
            input=dict(data=dict(train_data, split="validation"), batch_size=24, pp=IMAGE_PP),
            model=dict(
                img=dict(width=32, depth=1, num_heads=2, patch_size=16, num_registers=1),
                txt=dict(vocab_size=tok.vocab_size, depth=1, max_len=MAX_LEN, posemb="rope"),
            ),
            mesh=[("data", 2), ("fsdp", 4)],
            fsdp_min_size=1,
        )
    )
    config, task_module = train.prepare_config(config)
    task = task_module.Task(config)
    example = {"image": np.zeros((1, 64, 64, 3), np.float32), "labels": np.zeros((1, 4), np.int32)}
    shapes = jax.eval_shape(task.init_params, jax.random.key(0), example)
    return config, task, _random_params(shapes), pp_text.get_tokenizer(path)


def _random_params(shapes):
    """Random parameters drawn in numpy (no compilation; the real init has a zero head, i.e.
    uniform logits): unit-variance kernels, norm scales near 1, so scores depend on image and text."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        value = rng.normal(size=leaf.shape).astype(np.float32)
        if "kernel" in name:
            return value / np.sqrt(leaf.shape[0])
        return 1 + 0.1 * value if "scale" in name else value * (1.0 if "embedding" in name else 0.1)

    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.fixture(scope="module")
def reference(setup):
    """Per-pair log-likelihoods: every (image, caption) pair is its own row through the FULL model
    (encoder included) with the task's own decoder inputs and sequence_xent."""
    _, task, params, _ = setup

    @jax.jit
    def pair_ll(image, labels):
        logits = task.cap_logits(params, image, labels)
        xent, count = cappa.sequence_xent(logits, labels, task.pad_id)
        return -xent * count, -xent  # (sum, mean) over non-pad tokens

    def scores(images, tokens, normalize):
        b, c = len(images), len(tokens)
        out = pair_ll(np.repeat(images, c, axis=0), np.tile(tokens, (b, 1)))[int(normalize)]
        return np.asarray(out).reshape(b, c)

    return scores


@pytest.fixture(scope="module")
def small(setup):
    _, _, _, tok = setup
    images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
    prompts = scoring.class_prompts(["red circle", "big blue star", "cross"], TEMPLATES)
    return images, scoring.encode_prompts(tok, prompts, MAX_LEN)


@pytest.fixture(scope="module")
def scorer(setup):
    _, task, params, _ = setup

    @jax.jit
    def encode(images):
        return task.model.apply({"params": params}, images, method="encode")[0]

    def score(images, tokens, normalize=False, class_batch_size=None):
        fn = lambda e, t: scoring.score_captions(
            task.model, params, e, t, task.pad_id, normalize, class_batch_size
        )
        return np.asarray(jax.jit(fn)(encode(images), tokens))

    return score, encode


@pytest.mark.parametrize("normalize", [False, True])
def test_score_captions_matches_per_pair_reference(small, scorer, reference, normalize):
    images, tokens = small
    lengths = (tokens != 0).sum(1)
    assert len(set(lengths.tolist())) > 2  # Captions of different lengths: the reduction matters.
    got = scorer[0](images, tokens, normalize)
    want = reference(images, tokens, normalize)
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.ptp(want, axis=0).min() > 1e-3  # Scores depend on the image, not only the text.


def test_chunked_equals_unchunked(small, scorer):
    images, tokens = small
    full = scorer[0](images, tokens)
    for chunk in (1, 4):  # 4 does not divide 6: the last chunk is padded.
        np.testing.assert_allclose(
            scorer[0](images, tokens, class_batch_size=chunk), full, atol=1e-5
        )


def test_template_average_is_mean_log_likelihood_over_templates(setup, small, scorer):
    _, _, _, tok = setup
    images, tokens = small
    combined = scoring.average_templates(jnp.asarray(scorer[0](images, tokens)), len(TEMPLATES))
    names = ["red circle", "big blue star", "cross"]
    per_template = [
        scorer[0](images, scoring.encode_prompts(tok, [t.format(n) for n in names], MAX_LEN))
        for t in TEMPLATES
    ]
    np.testing.assert_allclose(np.asarray(combined), np.mean(per_template, axis=0), atol=1e-5)


def test_score_pairs_matches_reference(setup, small, scorer, reference):
    _, task, params, _ = setup
    images, tokens = small
    pairs = np.stack([tokens[:3], tokens[3:]], axis=1)  # image i gets captions i and i + 3
    got = scoring.score_pairs(task.model, params, scorer[1](images), pairs, task.pad_id, True)
    full = reference(images, tokens, True)
    want = np.stack([full[np.arange(3), np.arange(3)], full[np.arange(3), np.arange(3) + 3]], 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_encode_prompts_rejects_truncation(setup):
    with pytest.raises(ValueError, match="needs .* tokens"):
        scoring.encode_prompts(setup[3], ["a big purple cross on a dark background"], 4)


def test_swap_word_replaces_first_listed_word_only():
    op = pp.get_op("swap_word")(words=render.COLOR_NAMES, key="text", outkey="neg")
    text = "two red stars next to a big blue cross, red again"
    outs = set()
    for i in range(40):
        out = op({"text": tf.constant(text), "_seed": tf.constant([7, i], tf.int64)})
        neg = out["neg"].numpy().decode().split(" ")
        assert out["text"].numpy().decode() == text
        words = text.split(" ")
        assert neg[1] in render.COLOR_NAMES and neg[1] != "red"
        assert neg[:1] + neg[2:] == words[:1] + words[2:]
        outs.add(neg[1])
    assert outs == set(render.COLOR_NAMES) - {"red"}  # Every other colour is drawn.
    with pytest.raises(tf.errors.InvalidArgumentError, match="swap_word"):
        op({"text": tf.constant("a square"), "_seed": tf.constant([0, 0], tf.int64)})
    with pytest.raises(ValueError, match="distinct single words"):
        pp.get_op("swap_word")(words=["red"])


def test_cappa_task_provides_both_evaluators(setup):
    task = setup[1]
    assert evaluators.resolve("zeroshot", task) is scoring.ZeroShotEvaluator
    assert evaluators.resolve("pairwise", task) is scoring.PairwiseEvaluator


def test_class_names_from_tfds_and_import_string(data_dir):
    data = {"name": "scenes/tiny", "split": "validation", "data_dir": data_dir}
    names = list(scenes.LABEL_NAMES)
    assert scoring.resolve_class_names({"class_names_from": "tfds:label"}, data) == names
    spec = "transfer.datasets.scenes:LABEL_NAMES"
    assert scoring.resolve_class_names({"class_names_from": spec}, data) == names
    with pytest.raises(ValueError, match="exactly one"):
        scoring.resolve_class_names({"class_names": names, "class_names_from": spec}, data)
    with pytest.raises(ValueError, match="not a ClassLabel"):
        scoring.resolve_class_names({"class_names_from": "tfds:image/id"}, data)


def _build(setup, cls, eval_cfg):
    """(evaluator, params sharded like the loop's, mesh): a 2x4 mesh with FSDP-sharded params."""
    config, task, params, _ = setup
    mesh = sharding.make_mesh(config.mesh)
    batch_sh = sharding.batch_sharding(mesh, sharding.batch_axes(mesh))
    param_sh = sharding.tree_shardings(jax.eval_shape(lambda: params), mesh, config)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(param_sh))
    with jax.set_mesh(mesh):
        evaluator = cls(eval_cfg, contracts.EvalContext(config, task, mesh, batch_sh, param_sh))
    return evaluator, jax.device_put(params, param_sh), mesh


def _run(setup, cls, eval_cfg):
    evaluator, params, mesh = _build(setup, cls, eval_cfg)
    with jax.set_mesh(mesh):  # As in the train loop.
        return evaluator.run(params)


def _examples(config, pp_string):
    """The real (unmasked) examples of the validation split, as the evaluators read them."""
    batches = input_pipeline.eval_batches(
        {"data": config.input.data, "pp": pp_string},
        batch_size=16,
        process_count=1,
        process_index=0,
    )
    batch = next(iter(batches))
    assert batch["_mask"].all()
    return batch


def test_zeroshot_evaluator_matches_direct_argmax(setup, reference):
    config, _, _, tok = setup
    eval_pp = f"{IMAGE_PP}|keep('image', 'label')"
    batch = _examples(config, eval_pp)
    base = list(scenes.LABEL_NAMES)
    tokens = scoring.encode_prompts(tok, scoring.class_prompts(base, TEMPLATES), MAX_LEN)
    scores = reference(batch["image"], tokens, False).reshape(16, 2, 42).mean(1)
    labels = batch["label"]
    # A random model rarely ranks the true class first. Reorder the class names so that, for as
    # many examples as possible, the name the model prefers sits at the index of the true label:
    # then prec@1 is far from 0 and a label/index mix-up or counted padding changes it.
    perm: dict[int, int] = {}
    for label, pred in zip(labels, scores.argmax(1), strict=True):
        if label not in perm and pred not in perm.values():
            perm[int(label)] = int(pred)
    # Then put the labels left on the names most often in an image's top 5 (prec@5 is not ~0).
    often = np.bincount(np.argsort(-scores, axis=1)[:, :5].ravel(), minlength=42)
    free = [c for c in np.argsort(-often, kind="stable") if c not in perm.values()]
    for label in dict.fromkeys(labels.tolist()):
        if label not in perm:
            perm[label] = int(free.pop(0))
    perm.update(zip(sorted(set(range(42)) - set(perm)), free, strict=True))
    permuted = scores[:, [perm[c] for c in range(42)]]
    top5 = np.argsort(-permuted, axis=1)[:, :5]
    want1, want5 = np.mean(permuted.argmax(1) == labels), np.mean((top5 == labels[:, None]).any(1))
    assert want1 > 0 and 0.25 < want5 < 1
    eval_cfg = dict(
        type="zeroshot",
        pp=eval_pp,
        templates=TEMPLATES,
        class_batch_size=32,
        class_names=[base[perm[c]] for c in range(42)],
        log_steps=10,
    )
    evaluator, params, mesh = _build(setup, scoring.ZeroShotEvaluator, eval_cfg)
    with jax.set_mesh(mesh):
        got = jax.jit(evaluator.class_scores)(params, batch["image"], evaluator.prompts)
        np.testing.assert_allclose(np.asarray(got), permuted, rtol=1e-5, atol=1e-4)
        # ... from prompts cut after the longest one's EOS (the reference scored all MAX_LEN).
        longest = int((tokens != tok.pad_id).sum(1).max())
        assert evaluator.prompts.shape == (len(tokens), longest) and longest < MAX_LEN
        assert evaluator.run(params) == pytest.approx({"prec@1": want1, "prec@5": want5})


def test_pairwise_evaluator_matches_direct_comparison(setup, reference):
    config, _, _, tok = setup
    tokenize = f"tokenize(max_len={MAX_LEN}, model='{config.tokenizer}'"
    eval_pp = (
        f"{IMAGE_PP}|flatten|choice(key='captions/text', outkey='text')"
        f"|swap_word(words={render.COLOR_NAMES}, key='text', outkey='neg_text')"
        f"|{tokenize}, key='text', outkey='pos')|{tokenize}, key='neg_text', outkey='neg')"
        "|keep('image', 'pos', 'neg')"
    )
    batch = _examples(config, eval_pp)
    assert (batch["pos"] != batch["neg"]).any(1).all()
    tokens = np.concatenate([batch["pos"], batch["neg"]])
    full = reference(batch["image"], tokens, True)
    pos, neg = full[np.arange(16), np.arange(16)], full[np.arange(16), np.arange(16) + 16]
    want = np.mean(pos > neg)
    assert 0 < want < 1
    eval_cfg = dict(
        type="pairwise", pp=eval_pp, positive_key="pos", negative_key="neg", normalize=True
    )
    assert _run(setup, scoring.PairwiseEvaluator, eval_cfg) == pytest.approx({"accuracy": want})


def test_bad_evaluator_configs_fail_clearly(setup):
    base = dict(type="zeroshot", pp=f"{IMAGE_PP}|keep('image', 'label')", class_names=["a"])
    with pytest.raises(ValueError, match="Unknown keys \\['templtes'\\]"):
        _run(setup, scoring.ZeroShotEvaluator, {**base, "templtes": ["{}"]})
    with pytest.raises(ValueError, match="'\\{\\}' in each"):
        _run(setup, scoring.ZeroShotEvaluator, {**base, "templates": ["a shape"]})
    with pytest.raises(ValueError, match="class indices in \\[0, 1\\)"):
        _run(setup, scoring.ZeroShotEvaluator, base)
    with pytest.raises(ValueError, match="set `pp`"):
        _run(setup, scoring.PairwiseEvaluator, dict(type="pairwise"))
    with pytest.raises(ValueError, match="does not produce \\['positive', 'negative'\\]"):
        _run(
            setup, scoring.PairwiseEvaluator, dict(type="pairwise", pp=f"{IMAGE_PP}|keep('image')")
        )

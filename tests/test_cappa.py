"""CapPa model and objective: branch inputs and masks, first loss, caching, precision, the loss vs numpy."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pretrain import cappa, cappa_task

VOCAB = 50
MAX_LEN = 8


def tiny_model_cfg(**txt):
    cfg = jax.tree.map(lambda x: x, cappa.MODEL_DEFAULTS)
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    cfg["img"].update(width=32, depth=1, num_heads=2, patch_size=8, num_registers=2)
    cfg["txt"].update(vocab_size=VOCAB, depth=2, max_len=MAX_LEN, **txt)
    return cfg


def task_for(model_cfg, masked_pred_prob=0.75):
    config = ml_collections.ConfigDict(
        dict(cappa_task.DEFAULTS, model=model_cfg, masked_pred_prob=masked_pred_prob)
    )
    return cappa_task.Task(config)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(2, VOCAB, (4, MAX_LEN)).astype(np.int32)
    labels[:, 5] = 1  # EOS
    labels[:, 6:] = 0  # pad
    labels[3, 2:] = 0  # a short caption
    labels[3, 1] = 1
    image = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    return {"image": image, "labels": labels}


@pytest.fixture(scope="module")
def task_and_params(batch):
    task = task_for(tiny_model_cfg(norm="rmsnorm", normformer=True, mlp_type="geglu"))
    params = task.init_params(jax.random.key(0), batch)
    return task, params


def test_decoder_inputs_of_both_branches():
    labels = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    tokens, mask = cappa.decoder_inputs(labels, jnp.array([False, True]), mask_id=VOCAB)
    np.testing.assert_array_equal(tokens[0], [0, 5, 6, 7, 1])  # Cap: shifted right, start 0
    np.testing.assert_array_equal(tokens[1], [VOCAB] * 5)  # Pa: every input is [MASK]
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((5, 5), bool)))  # causal
    assert mask[1].all()  # full attention


def test_first_loss_is_ln_vocab_in_both_branches(task_and_params, batch):
    task, params = task_and_params
    for p in (0.0, 1.0):
        task.config.masked_pred_prob = p
        loss, aux = task.loss_fn(params, batch, jax.random.key(1))
        assert float(loss) == pytest.approx(math.log(VOCAB), rel=1e-6)
        assert float(aux["pa_fraction"]) == p
    task.config.masked_pred_prob = 0.75


def test_branch_fraction_follows_masked_pred_prob(task_and_params):
    task, params = task_and_params
    rng = np.random.default_rng(1)
    big = {
        "image": rng.normal(size=(256, 16, 16, 3)).astype(np.float32),
        "labels": rng.integers(1, VOCAB, (256, MAX_LEN)).astype(np.int32),
    }
    _, aux = jax.jit(task.loss_fn)(params, big, jax.random.key(2))
    assert 0.75 - 0.1 < float(aux["pa_fraction"]) < 0.75 + 0.1


def test_sequence_xent_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    labels = np.array([[3, 1, 0, 0], [2, 2, 5, 1], [0, 0, 0, 0]])
    losses, count = cappa.sequence_xent(jnp.asarray(logits), jnp.asarray(labels), pad_id=0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for i in range(3):
        keep = labels[i] != 0
        tok = -logp[i, np.arange(4), labels[i]][keep]
        expected = tok.mean() if keep.any() else 0.0
        assert float(losses[i]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert float(count[i]) == keep.sum()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sequence_xent_equals_dense_smoothed_targets_with_gradients(smoothing):
    """The integer-label form equals optax's dense cross-entropy on smoothed one-hot targets, in
    value and in gradient (what training sees)."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, (3, 5)), jnp.int32)

    def dense(logits):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, 11), smoothing)
        token = optax.softmax_cross_entropy(logits, targets)
        weights = (labels != 0).astype(jnp.float32)
        return jnp.sum(token * weights, -1) / jnp.maximum(weights.sum(-1), 1.0)

    ours = lambda logits: cappa.sequence_xent(logits, labels, 0, smoothing)[0]
    np.testing.assert_allclose(ours(logits), dense(logits), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * jnp.arange(1.0, 4.0)))(logits)
    np.testing.assert_allclose(grad(ours), grad(dense), rtol=1e-5, atol=1e-6)


def test_eval_loss_is_cap_only_and_skips_pads(task_and_params, batch):
    task, params = task_and_params
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(9), p.shape), params
    )
    out = task.eval_metrics(params, batch)
    np.testing.assert_allclose(out["tokens"], [6, 6, 6, 2])
    logits = np.asarray(task.cap_logits(params, batch["image"], batch["labels"]))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for i, labels in enumerate(batch["labels"]):
        n = int(out["tokens"][i])
        expected = -logp[i, np.arange(n), labels[:n]].mean()
        assert float(out["loss"][i]) == pytest.approx(expected, rel=1e-5)


def test_params_fp32_and_bf16_compute_close(batch):
    cfg = tiny_model_cfg()
    task32 = task_for(cfg)
    params = task32.init_params(jax.random.key(3), batch)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    params = jax.tree.map(
        lambda p: p + 0.02 * jax.random.normal(jax.random.key(4), p.shape), params
    )
    cfg16 = dict(cfg, dtype="bfloat16")
    task16 = task_for(cfg16)
    l32 = task32.cap_logits(params, batch["image"], batch["labels"])
    l16 = task16.cap_logits(params, batch["image"], batch["labels"])
    assert l16.dtype == jnp.float32  # logits/loss computed in float32
    np.testing.assert_allclose(l16, l32, atol=0.1)


@pytest.mark.parametrize("scan,posemb", [(False, "learn"), (True, "rope")])
def test_kv_cache_matches_full_recomputation(batch, scan, posemb):
    task = task_for(tiny_model_cfg(scan=scan, posemb=posemb))
    params = task.init_params(jax.random.key(5), batch)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(6), p.shape), params)
    model = task.model
    labels = jnp.asarray(batch["labels"])
    full = task.cap_logits(params, batch["image"], labels)
    tokens = cappa.shift_right(labels)
    kw = dict(decode=True, method=cappa.Model.decode, mutable=["cache"])
    # Everything compiled (op-by-op scanned layers are slow); one single-token step serves every
    # position.
    enc, _ = jax.jit(lambda im: model.apply({"params": params}, im, method=cappa.Model.encode))(
        batch["image"]
    )
    out, vs = jax.jit(lambda tok, enc: model.apply({"params": params}, tok, enc, **kw))(
        tokens[:, :2], enc
    )
    step = jax.jit(
        lambda cache, tok: model.apply({"params": params, "cache": cache}, tok, None, **kw)
    )
    pieces = [out]
    for t in range(2, MAX_LEN):
        cache = vs["cache"]
        assert all(leaf.shape[0] == labels.shape[0] for leaf in jax.tree.leaves(cache))
        out, vs = step(cache, tokens[:, t : t + 1])
        pieces.append(out)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)


def test_param_paths_follow_the_documented_layout(task_and_params):
    _, params = task_and_params
    txt = params["txt"]
    assert txt["embedding"]["embedding"].shape == (VOCAB + 1, 32)  # row VOCAB = [MASK]
    assert set(txt["head"]) == {"kernel", "bias"}
    block = txt["decoder"]["block_0"]
    assert {"self_attn", "cross_attn", "mlp", "norm_self_post", "norm_cross_post"} <= set(block)
    assert "bias" not in block["self_attn"]["query"]
    assert np.all(txt["head"]["kernel"] == 0)


@pytest.mark.parametrize("posemb", ["rope", "learn"])
def test_pa_needs_absolute_positions(batch, posemb):
    """All-[MASK] inputs are identical: with rotary positions only, every position gets the same
    Pa logits (a bag of tokens); learnt positions tell them apart."""
    task = task_for(tiny_model_cfg(posemb=posemb))
    params = task.init_params(jax.random.key(7), batch)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(8), p.shape), params)
    labels = jnp.asarray(batch["labels"])
    tokens, mask = cappa.decoder_inputs(labels, jnp.ones((4,), bool), task.mask_id)
    logits, _ = task.model.apply({"params": params}, batch["image"], tokens, mask)
    spread = float(jnp.max(jnp.abs(logits - logits[:, :1])))
    assert (spread < 1e-4) if posemb == "rope" else (spread > 1e-2)

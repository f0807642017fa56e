"""SigLiT / Llip (tasks/siglit.py, tasks/llip.py, pretrain/text_encoder.py): Llip's mixing against a per-pair numpy
loop and its uniform limit (= the register average), embedding shapes and logits, padding-invariant text
embeddings, eval metrics against numpy, and two runs through the train loop on 8 devices from a CapPa checkpoint:
t and b at their configured values, the text tower carrying the CapPa decoder's values (or not, from scratch),
the tower frozen bit-for-bit with no optimizer state while the rest moves, and the first loss equal to a numpy
sigmoid loss of the same batch."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pretrain import cappa, text_encoder
from tasks import llip, siglit
from transfer import checkpoint, metrics, train, tree
from transfer import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 16
IMG = dict(
    width=32,
    depth=1,
    mlp_dim=64,
    num_heads=2,
    patch_size=8,
    num_registers=2,
    norm="rmsnorm",
    normformer=True,
    mlp_type="geglu",
    use_bias=False,
    pool_type="none",
)
TXT = dict(
    depth=2,
    mlp_dim=64,
    max_len=MAX_LEN,
    norm="rmsnorm",
    normformer=True,
    mlp_type="geglu",
    use_bias=False,
    posemb="learn",
)
NEW_PARAMS = ["img_head/.*", "llip/.*", "txt/proj/.*", "txt/map/.*", "t", "b"]


def _config(tokenizer, data_dir=None, **overrides) -> ml_collections.ConfigDict:
    pp = (
        "decode|resize(32)|value_range(-1, 1)|flatten|choice(key='captions/text', outkey='text')"
        f"|tokenize(max_len={MAX_LEN}, model='{tokenizer.path}', key='text', outkey='labels')"
        "|keep('image', 'labels')"
    )
    base = dict(
        task="tasks.siglit",
        total_steps=3,
        tokenizer=tokenizer.path,
        input=dict(
            data=dict(name="scenes/tiny", split="train", data_dir=data_dir),
            batch_size=16,
            pp=pp,
            shuffle_buffer_size=64,
        ),
        model=dict(img=IMG, txt=dict(TXT, vocab_size=tokenizer.vocab_size)),
        lr=3e-3,
        log_training_steps=1,
        ckpt_steps=3,
        log_flops=False,
    )
    for key, value in overrides.items():
        base[key] = dict(base[key], **value) if isinstance(value, dict) and key in base else value
    return train.prepare_config(ml_collections.ConfigDict(base))[0]


def _batch(tokenizer, n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
    texts = ["a red circle", "two blue stars on the left", "a big green cross"] * n
    return images, tokenizer.encode(texts[:n], MAX_LEN)


def _np_sigmoid_loss(logits):
    labels = 2 * np.eye(len(logits)) - 1
    return -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / len(logits)


def _np_llip(p, tokens, text, tau):
    """Llip's similarity by its definition: every (image, text) pair and head on its own."""
    wq, wk, wv, wo = (
        np.asarray(p[k]["kernel"], np.float64) for k in ("query", "key", "value", "out")
    )
    m, hd = wq.shape[1:]
    out = np.zeros((len(tokens), len(text)))
    for i, h in enumerate(np.asarray(tokens, np.float64)):
        for j, g in enumerate(np.asarray(text, np.float64)):
            heads = []
            for head in range(m):
                z = (h @ wk[:, head]) @ (g @ wq[:, head]) / (np.sqrt(hd) * tau)
                w = np.exp(z - z.max())
                heads.append((w / w.sum()) @ (h @ wv[:, head]))
            z = np.concatenate(heads) @ wo.reshape(m * hd, -1)
            out[i, j] = z @ g / np.linalg.norm(z)
    return out


# ---------------------------------------------------------------------------------------------- Llip mixing
@pytest.fixture(scope="module")
def llip_head():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 4, 6)).astype(np.float32)
    text = rng.normal(size=(5, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    head = llip.LlipHead(embed_dim=8, num_heads=2, temperature=5.0)
    params = head.init(jax.random.key(0), tokens, text)["params"]
    params = jax.tree.map(lambda x: 3 * x, params)  # Sharper weights: far from uniform.
    return head, params, tokens, text


def test_llip_matches_a_per_pair_numpy_loop(llip_head):
    head, params, tokens, text = llip_head
    got = jax.jit(head.apply)({"params": params}, tokens, text)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, _np_llip(params, tokens, text, 5.0), rtol=1e-4, atol=1e-5)


def test_llip_uniform_mixing_is_the_register_average(llip_head):
    head, params, tokens, text = llip_head
    wv = np.asarray(params["value"]["kernel"]).reshape(6, -1)
    wo = np.asarray(params["out"]["kernel"]).reshape(-1, 8)
    z = tokens.mean(axis=1) @ wv @ wo  # Average pooling of the registers, then the same maps.
    want = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ text.T
    zero_query = dict(params, query={"kernel": jnp.zeros_like(params["query"]["kernel"])})
    weights = head.apply({"params": zero_query}, tokens, text, method="mixing_weights")
    np.testing.assert_allclose(weights, 0.25, atol=1e-7)  # [B, N, M, K], K = 4
    np.testing.assert_allclose(head.apply({"params": zero_query}, tokens, text), want, atol=1e-5)
    hot = llip.LlipHead(embed_dim=8, num_heads=2, temperature=1e9)  # tau -> inf
    np.testing.assert_allclose(hot.apply({"params": params}, tokens, text), want, atol=1e-5)
    sharp = head.apply({"params": params}, tokens, text, method="mixing_weights")
    assert np.abs(np.asarray(sharp) - 0.25).max() > 0.05  # The general case really is not uniform.


def test_llip_rejects_bad_settings():
    with pytest.raises(ValueError, match="not divisible by llip.num_heads"):
        llip.LlipHead(embed_dim=8, num_heads=3).init(
            jax.random.key(0), jnp.ones((1, 2, 4)), jnp.ones((1, 8))
        )
    with pytest.raises(ValueError, match="temperature must be > 0"):
        llip.LlipHead(embed_dim=8, num_heads=2, temperature=0.0).init(
            jax.random.key(0), jnp.ones((1, 2, 4)), jnp.ones((1, 8))
        )


# ---------------------------------------------------------------------------------------------- task API
@pytest.fixture(scope="module", params=["siglip", "llip"])
def api(request, scenes_tokenizer):
    is_llip = request.param == "llip"
    config = _config(scenes_tokenizer, model=dict(llip=dict(enabled=is_llip, num_heads=2)))
    task = siglit.Task(config)
    images, tokens = _batch(scenes_tokenizer, 3)
    params = task.init_params(jax.random.key(0), {"image": images, "labels": tokens})
    return task, params, is_llip


def test_embeddings_similarity_and_logits(api, scenes_tokenizer):
    task, params, is_llip = api
    images, _ = _batch(scenes_tokenizer, 3)
    _, tokens = _batch(scenes_tokenizer, 5, seed=1)
    img = jax.jit(task.embed_images)(params, images)
    txt = np.asarray(jax.jit(task.embed_texts)(params, tokens))
    assert txt.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    if is_llip:
        assert img.shape == (3, 2, 32)  # The K = 2 registers of the tower, before mixing.
        want = _np_llip(params["llip"], img, txt, 5.0)
    else:
        assert img.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)
        want = np.asarray(img) @ txt.T
    sim = np.asarray(jax.jit(task.similarity)(params, img, txt))
    np.testing.assert_allclose(sim, want, rtol=1e-4, atol=1e-5)
    logits = jax.jit(task.logits)(params, img, txt)
    np.testing.assert_allclose(logits, 10.0 * sim - 10.0, rtol=1e-5, atol=1e-4)  # The defaults.
    assert task.text_key == "labels" and task.text_max_len == MAX_LEN
    from tasks import retrieval_eval

    assert task.evaluators() == retrieval_eval.EVALUATORS  # "zeroshot_embed" and "retrieval"


def test_eval_metrics_match_numpy_and_ignore_padding(api, scenes_tokenizer):
    task, params, _ = api
    images, tokens = _batch(scenes_tokenizer, 3)
    batch = {"image": images, "labels": tokens, "_mask": np.array([1, 1, 0])}
    got = jax.jit(task.eval_metrics)(params, batch)
    img = jax.jit(task.embed_images)(params, images[:2])
    txt = jax.jit(task.embed_texts)(params, tokens[:2])
    logits = np.asarray(jax.jit(task.logits)(params, img, txt), np.float64)
    labels = 2 * np.eye(2) - 1
    want = -np.log(1 / (1 + np.exp(-labels * logits))).sum(
        axis=1
    )  # The padded caption is no negative.
    np.testing.assert_allclose(np.asarray(got["loss"])[:2], want, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["i2t_top1"])[:2], logits.argmax(1) == [0, 1])
    np.testing.assert_array_equal(np.asarray(got["t2i_top1"])[:2], logits.argmax(0) == [0, 1])


def test_registers_head_is_the_projected_register_mean(scenes_tokenizer):
    task = siglit.Task(_config(scenes_tokenizer, model=dict(img_head=dict(kind="registers"))))
    images, tokens = _batch(scenes_tokenizer, 3)
    params = jax.jit(task.init_params)(jax.random.key(0), {"image": images, "labels": tokens})
    encoded = jax.jit(
        lambda p, x: task.model.apply({"params": p}, x, method=lambda m, x: m.img(x)[1]["encoded"])
    )(params, images)
    z = np.asarray(encoded)[:, -2:].mean(axis=1) @ np.asarray(params["img_head"]["proj"]["kernel"])
    want = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(
        jax.jit(task.embed_images)(params, images), want, rtol=1e-5, atol=1e-6
    )
    assert set(params["img_head"]) == {"proj"}


@pytest.mark.parametrize("pool", ["eos", "map"])
def test_text_embedding_ignores_padding(pool, scenes_tokenizer):
    enc = text_encoder.TextEncoder(
        vocab_size=96, embed_dim=8, width=16, depth=1, num_heads=2, max_len=24, pool=pool
    )
    _, short = _batch(scenes_tokenizer, 3)
    long = np.pad(short, ((0, 0), (0, 8)))  # 8 more pad tokens (pad id 0).
    params = jax.jit(enc.init)(jax.random.key(0), long)
    apply = jax.jit(enc.apply)
    np.testing.assert_allclose(apply(params, short), apply(params, long), rtol=1e-5, atol=1e-6)


def test_config_errors_are_clear(scenes_tokenizer):
    no_registers = dict(img=dict(IMG, num_registers=0))
    with pytest.raises(config_lib.ConfigError, match="num_registers = 0"):
        siglit.Task(_config(scenes_tokenizer, model=dict(no_registers, llip=dict(enabled=True))))
    with pytest.raises(config_lib.ConfigError, match="kind='map'"):
        siglit.Task(
            _config(scenes_tokenizer, model=dict(no_registers, img_head=dict(kind="registers")))
        )
    with pytest.raises(config_lib.ConfigError, match="txt.pool"):
        siglit.Task(_config(scenes_tokenizer, model=dict(txt=dict(TXT, vocab_size=96, pool="cls"))))
    with pytest.raises(config_lib.ConfigError, match="vocab_size to at least 96"):
        siglit.Task(_config(scenes_tokenizer, model=dict(txt=dict(TXT, vocab_size=50))))
    with pytest.raises(config_lib.ConfigError, match="loss_mode"):
        siglit.Task(_config(scenes_tokenizer, loss_mode="blockwise"))


@pytest.mark.parametrize(
    "arg", [None, "llip", "txt_init=scratch", "llip,txt_init=scratch,tower=w,tokenizer=t.model"]
)
def test_shipped_config_loads(arg):
    spec = os.path.join(ROOT, "configs", "siglit.py") + (f":{arg}" if arg else "")
    config, _ = train.prepare_config(config_lib.load_config_file(spec))
    assert config.schedule[0] == ("img/.*", None)
    assert config.model.llip.enabled == ("llip" in (arg or ""))
    assert ("txt/.*" in config.model_load.dont_load) == ("scratch" in (arg or ""))
    with pytest.raises(ValueError, match="txt_init=cappa or txt_init=scratch"):
        config_lib.load_config_file(os.path.join(ROOT, "configs", "siglit.py:txt_init=bert"))


# ---------------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def cappa_tower(scenes_tokenizer, tmp_path_factory):
    """A CapPa run's checkpoint (params written directly: random, every leaf perturbed off its init)."""
    model = cappa.Model(
        **cappa.model_kwargs(
            dict(
                img=IMG,
                txt=dict(
                    cappa.MODEL_DEFAULTS["txt"], **TXT, vocab_size=scenes_tokenizer.vocab_size
                ),
            )
        )
    )
    params = model.init(
        jax.random.key(7), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, MAX_LEN), jnp.int32)
    )
    leaves, treedef = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(8), len(leaves))
    noisy = [
        np.asarray(x + 0.1 * jax.random.normal(k, x.shape))
        for x, k in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(treedef, noisy)
    workdir = str(tmp_path_factory.mktemp("cappa_tower"))
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    checkpoint.save(mngr, 1, params, {"step": np.int32(1)}, {"positions": [0], "step": 1})
    mngr.wait_until_finished()
    mngr.close()
    return workdir, tree.flatten(params)


@pytest.fixture(scope="module", params=["siglip_cappa_init", "llip_scratch"])
def loop_run(request, cappa_tower, scenes_tokenizer, data_dir, tmp_path_factory):
    """setup -> (initial params, first batch) -> run_loop, on all 8 devices (the ring loss is sharded)."""
    is_llip = request.param == "llip_scratch"
    tower_dir, _ = cappa_tower
    overrides = dict(
        model=dict(llip=dict(enabled=is_llip, num_heads=2)),
        model_init=tower_dir,
        model_load=dict(dont_load=NEW_PARAMS + (["txt/.*"] if is_llip else [])),
    )
    if not is_llip:
        overrides.update(logit_scale_init=5.0, logit_bias_init=-3.0)
    config = _config(scenes_tokenizer, data_dir, **overrides)
    workdir = str(tmp_path_factory.mktemp(request.param))
    run = train.setup(config, workdir)
    assert len(run.mesh.devices.flat) == 8
    initial = jax.device_get(tree.merge(run.state["params"], run.state["frozen"]))
    state_paths = {
        key: {
            jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(run.state[key])[0]
        }
        for key in ("params", "frozen", "opt")
    }
    batch = dict(run.first_batch)
    result = train.run_loop(run)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return dict(
        is_llip=is_llip,
        task=run.task,
        initial=initial,
        batch=batch,
        final=jax.device_get(result.params),
        rows=rows,
        state_paths=state_paths,
    )


def test_t_and_b_start_at_configured_values(loop_run):
    t, b = (float(loop_run["initial"][k]) for k in ("t", "b"))
    want = (
        (math.log(10.0), -10.0) if loop_run["is_llip"] else (math.log(5.0), -3.0)
    )  # defaults / set
    assert (t, b) == pytest.approx(want, abs=1e-7)


def test_towers_start_from_the_cappa_checkpoint(loop_run, cappa_tower):
    _, source = cappa_tower
    init = tree.flatten(loop_run["initial"])
    img = [p for p in init if p.startswith("img/")]
    txt_loaded = [
        p for p in init if p.startswith("txt/") and not p.startswith(("txt/proj/", "txt/map/"))
    ]
    assert img and all(np.array_equal(init[p], source[p]) for p in img)
    assert (
        len(txt_loaded) > 10
    )  # embedding, pos_embedding, 2 blocks of norms/self_attn/mlp, norm_final
    carried = [np.array_equal(init[p], source[p]) for p in txt_loaded]
    assert (
        all(carried) if not loop_run["is_llip"] else not any(carried)
    )  # CapPa init / from scratch
    assert not any("cross" in p for p in init)  # An encoder: no cross-attention parameters at all.


def test_tower_frozen_bit_for_bit_rest_trained(loop_run):
    init, final = tree.flatten(loop_run["initial"]), tree.flatten(loop_run["final"])
    paths = loop_run["state_paths"]
    assert all("'img'" in p for p in paths["frozen"]) and not any(
        "'img'" in p for p in paths["params"]
    )
    assert not any("'img'" in p for p in paths["opt"])  # No optimizer state for the tower.
    for path, value in init.items():
        if path.startswith("img/"):
            assert np.array_equal(final[path], value), path
    moved = [
        "txt/proj/kernel",
        "t",
        "b",
        "llip/query/kernel" if loop_run["is_llip"] else "img_head/proj/kernel",
    ]
    for path in moved:
        assert not np.allclose(final[path], init[path]), path


def test_first_loss_equals_numpy_sigmoid_loss(loop_run):
    task, params, batch = loop_run["task"], loop_run["initial"], loop_run["batch"]
    img = np.asarray(jax.jit(task.embed_images)(params, batch["image"]), np.float64)
    txt = np.asarray(jax.jit(task.embed_texts)(params, batch["labels"]), np.float64)
    if loop_run["is_llip"]:
        sim = _np_llip(params["llip"], img, txt, 5.0)
    else:
        sim = img @ txt.T
    logits = np.exp(float(params["t"])) * sim + float(params["b"])
    assert loop_run["rows"][0]["step"] == 1
    assert loop_run["rows"][0]["train/loss"] == pytest.approx(_np_sigmoid_loss(logits), rel=1e-5)

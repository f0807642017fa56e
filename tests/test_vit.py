"""Tests for pretrain/vit.py: tiny models, fixed shapes, numpy reference computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain.vit import (
    MlpBlock,
    Norm,
    ViT,
    decode_variant,
    posemb_sincos_2d,
    scan_to_unscanned,
    unscanned_to_scan,
)

B, RES, PATCH, C = 2, 16, 4, 3
N = (RES // PATCH) ** 2  # 16 patch tokens
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=PATCH)
FAMILIES = {
    "bv": dict(),
    "cappa": dict(
        norm="rmsnorm", normformer=True, mlp_type="geglu", use_bias=False, num_registers=3
    ),
}


def make(family="bv", **kw):
    return ViT(**TINY, **FAMILIES[family], **kw)


def init(model, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros((B, RES, RES, C)))["params"]


def flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def count(model, res):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, res, res, 3))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.fixture(scope="module")
def image():
    return jax.random.normal(jax.random.key(42), (B, RES, RES, C))


@pytest.fixture(scope="module")
def models():
    """Lazily built and cached (model, params) pairs shared by the tests."""
    cache = {}

    def get(family="bv", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            model = make(family, **kw)
            cache[key] = (model, init(model))
        return cache[key]

    return get


# ---------------------------------------------------------------- numpy reference of the model


def np_gelu(x):  # tanh approximation, as flax's nn.gelu default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_norm(x, p, kind, eps=1e-6):
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def np_dense(x, p, eq="...i,io->...o"):
    y = np.einsum(eq, x, p["kernel"])
    return y + p["bias"] if "bias" in p else y


def np_attn(xq, xkv, p):
    q = np_dense(xq, p["query"], "bnd,dhk->bnhk")
    k = np_dense(xkv, p["key"], "bnd,dhk->bnhk")
    v = np_dense(xkv, p["value"], "bnd,dhk->bnhk")
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np_dense(np.einsum("bhqs,bshk->bqhk", probs, v), p["out"], "bqhk,hkd->bqd")


def np_mlp(x, p, cfg):
    if cfg.get("mlp_type") == "geglu":
        h = np_gelu(np_dense(x, p["wi_0"])) * np_dense(x, p["wi_1"])
    else:
        h = np_gelu(np_dense(x, p["wi"]))
    if cfg.get("normformer"):
        h = np_norm(h, p["norm_mid"], cfg.get("norm", "layernorm"))
    return np_dense(h, p["wo"])


def np_vit(params, img, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    img = np.asarray(img, np.float64)
    kind = cfg.get("norm", "layernorm")
    b, g = img.shape[0], RES // PATCH
    patches = img.reshape(b, g, PATCH, g, PATCH, C).transpose(0, 1, 3, 2, 4, 5)
    x = np_dense(patches, p["embedding"], "bhwijc,ijcd->bhwd").reshape(b, g * g, -1)
    x = x + p["pos_embedding"]
    if cfg.get("num_registers"):
        x = np.concatenate(
            [x, np.broadcast_to(p["registers"], (b, *p["registers"].shape[1:]))], axis=1
        )
    for i in range(TINY["depth"]):
        bp = p["encoder"][f"block_{i}"]
        y = np_norm(x, bp["norm_attn_pre"], kind)
        y = np_attn(y, y, bp["attn"])
        if cfg.get("normformer"):
            y = np_norm(y, bp["norm_attn_post"], kind)
        x = x + y
        x = x + np_mlp(np_norm(x, bp["norm_mlp_pre"], kind), bp["mlp"], cfg)
    x = np_norm(x, p["encoder"]["norm_final"], kind)
    if cfg.get("pool_type") == "gap":
        x = x[:, :N].mean(1)
    return np_dense(x, p["head"]) if "head" in p else x


@pytest.mark.parametrize(
    "family,kw",
    [
        ("bv", dict(pool_type="gap", num_classes=5, head_zeroinit=False)),
        ("cappa", dict(pool_type="none")),
    ],
)
def test_matches_numpy_reference(models, image, family, kw):
    model, params = models(family, **kw)
    out, _ = model.apply({"params": params}, image)
    want = np_vit(params, image, {**FAMILIES[family], **kw})
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------- components


def test_rmsnorm_matches_numpy():
    x = np.random.RandomState(0).randn(3, 5, 8).astype(np.float32) * 3 + 1
    scale = np.random.RandomState(1).randn(8).astype(np.float32)
    y = Norm("rmsnorm").apply({"params": {"scale": scale}}, x)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    params = Norm("rmsnorm", use_bias=True).init(jax.random.key(0), x)["params"]
    assert set(params) == {"scale"}  # RMSNorm never has a bias


def test_layernorm_matches_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(4, 8).astype(np.float32) + 5
    p = {"scale": rng.randn(8).astype(np.float32), "bias": rng.randn(8).astype(np.float32)}
    y = Norm("layernorm").apply({"params": p}, x)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y), want * p["scale"] + p["bias"], rtol=1e-5, atol=1e-5)


def test_norm_computes_in_float32():
    x = (np.random.RandomState(0).randn(4, 64) * 100 + 1000).astype(jnp.bfloat16)
    y = Norm("layernorm", dtype=jnp.bfloat16).apply(
        {"params": {"scale": np.ones(64, np.float32), "bias": np.zeros(64, np.float32)}}, x
    )
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / x64.std(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=3e-2)


@pytest.mark.parametrize("normformer", [False, True])
def test_geglu_mlp_matches_numpy(normformer):
    x = np.random.RandomState(0).randn(2, 5, 8).astype(np.float32)
    mlp = MlpBlock(16, "geglu", use_bias=False, normformer=normformer, norm="rmsnorm")
    params = mlp.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params
    )  # non-trivial norm scales
    expected_keys = {"wi_0", "wi_1", "wo"} | ({"norm_mid"} if normformer else set())
    assert set(params) == expected_keys
    y = mlp.apply({"params": params}, x)
    p = jax.tree.map(np.asarray, params)
    h = np_gelu(x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])
    if normformer:
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * p["norm_mid"]["scale"]
    np.testing.assert_allclose(np.asarray(y), h @ p["wo"]["kernel"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- shapes, params, pooling


@pytest.mark.parametrize("family", ["bv", "cappa"])
@pytest.mark.parametrize("pool", ["gap", "map", "tok", "none"])
def test_output_shapes(models, image, family, pool):
    model, params = models(family, pool_type=pool)
    out, aux = model.apply({"params": params}, image)
    regs = FAMILIES[family].get("num_registers", 0)
    n_tok = N + regs + (pool == "tok")
    assert aux["stem"].shape == (B, N, 32)
    assert aux["encoded"].shape == (B, n_tok, 32)
    want = (B, n_tok, 32) if pool == "none" else (B, 32)
    assert out.shape == aux["pre_logits"].shape == want
    assert "logits" not in aux
    if pool == "tok":
        np.testing.assert_allclose(out, aux["encoded"][:, 0], rtol=1e-6)
    if pool == "map":
        assert {"probe", "attn", "norm", "mlp"} <= set(params["map"])


def test_registers_in_encoded_and_excluded_from_gap(models, image):
    model, params = models("cappa", pool_type="gap")
    assert params["registers"].shape == (1, 3, 32)
    out, aux = model.apply({"params": params}, image)
    np.testing.assert_allclose(out, aux["encoded"][:, :N].mean(1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, aux["encoded"].mean(1), atol=1e-4)
    # The register slots of `encoded` are the register tokens: changing them changes those slots.
    p2 = {**params, "registers": params["registers"] + 1.0}
    _, aux2 = model.apply({"params": p2}, image)
    assert not np.allclose(aux["encoded"][:, N:], aux2["encoded"][:, N:], atol=1e-3)


def test_bias_parameters_per_family(models):
    _, cappa = models("cappa", pool_type="map", num_classes=5)
    # A classifier head always keeps its bias (it is not part of the tower): the only one.
    assert [k for k in flat(cappa) if "bias" in k] == ["head/bias"]
    _, cappa_nohead = models("cappa", pool_type="none")
    assert not [k for k in flat(cappa_nohead) if "bias" in k]
    _, bv = models("bv", pool_type="gap")
    bv_names = flat(bv)
    for k in [
        "embedding/bias",
        "encoder/block_1/attn/query/bias",
        "encoder/block_1/mlp/wi/bias",
        "encoder/block_1/mlp/wo/bias",
        "encoder/block_1/norm_attn_pre/bias",
        "encoder/norm_final/bias",
    ]:
        assert k in bv_names, k


def test_parameter_paths(models):
    _, p = models("cappa", pool_type="tok", num_classes=5)
    names = set(flat(p))
    for k in [
        "embedding/kernel",
        "pos_embedding",
        "registers",
        "cls",
        "head/kernel",
        "encoder/block_0/attn/query/kernel",
        "encoder/block_1/attn/out/kernel",
        "encoder/block_1/mlp/wi_0/kernel",
        "encoder/block_1/mlp/wi_1/kernel",
        "encoder/block_1/mlp/norm_mid/scale",
        "encoder/block_1/mlp/wo/kernel",
        "encoder/block_1/norm_attn_pre/scale",
        "encoder/block_1/norm_attn_post/scale",
        "encoder/block_1/norm_mlp_pre/scale",
        "encoder/norm_final/scale",
    ]:
        assert k in names, k
    assert p["encoder"]["block_0"]["attn"]["query"]["kernel"].shape == (32, 4, 8)


def test_position_embeddings(models, image):
    _, p = models("bv", pool_type="gap")
    assert p["pos_embedding"].shape == (1, N, 32)
    _, p_tok = models("bv", pool_type="tok")  # the class token gets a position too (orig. ViT)
    assert p_tok["pos_embedding"].shape == (1, N + 1, 32)
    _, p_cappa = models("cappa", pool_type="none")  # registers get none
    assert p_cappa["pos_embedding"].shape == (1, N, 32)
    model, p_sc = models("bv", pool_type="gap", posemb="sincos2d")
    assert "pos_embedding" not in p_sc
    assert model.apply({"params": p_sc}, image)[0].shape == (B, 32)


def _permute_patches(img, perm):
    g = RES // PATCH
    t = img.reshape(B, g, PATCH, g, PATCH, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)
    t = t[:, perm].reshape(B, g, g, PATCH, PATCH, C).transpose(0, 1, 3, 2, 4, 5)
    return t.reshape(B, RES, RES, C)


def test_position_embedding_breaks_permutation_invariance(models, image):
    model, params = models("bv", pool_type="gap")
    perm = np.random.RandomState(0).permutation(N)
    out = model.apply({"params": params}, image)[0]
    permuted = _permute_patches(image, perm)
    out_perm = model.apply({"params": params}, permuted)[0]
    assert not np.allclose(out, out_perm, atol=1e-4)
    # Permuting the position embeddings along with the patches restores the output exactly:
    # the position embedding is the only source of position information.
    p2 = {**params, "pos_embedding": params["pos_embedding"][:, perm]}
    np.testing.assert_allclose(model.apply({"params": p2}, permuted)[0], out, rtol=1e-4, atol=1e-5)


def test_head_zero_init(models, image):
    model, params = models("bv", pool_type="gap", num_classes=7)
    assert not np.any(params["head"]["kernel"]) and not np.any(params["head"]["bias"])
    out, aux = model.apply({"params": params}, image)
    assert out.shape == (B, 7)
    np.testing.assert_array_equal(out, np.zeros((B, 7)))
    np.testing.assert_array_equal(out, aux["logits"])
    assert np.any(aux["pre_logits"])


# ---------------------------------------------------------------- scan, remat, dtype, dropout


def test_scan_matches_unscanned(models, image):
    model_s, params_s = models("cappa", pool_type="gap", scan=True)
    model_u, params_u = models("cappa", pool_type="gap")
    blocks = params_s["encoder"]["blocks"]
    assert blocks["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
    converted = scan_to_unscanned(params_s)
    assert jax.tree.structure(converted) == jax.tree.structure(params_u)
    out_s = model_s.apply({"params": params_s}, image)[0]
    out_u = model_u.apply({"params": converted}, image)[0]
    np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
    # and the other way, on a nested tree as a task would hold it
    back = unscanned_to_scan({"img": params_u})["img"]
    assert jax.tree.structure(back) == jax.tree.structure(params_s)
    np.testing.assert_allclose(
        model_s.apply({"params": back}, image)[0],
        model_u.apply({"params": params_u}, image)[0],
        rtol=1e-5,
        atol=1e-5,
    )
    roundtrip = unscanned_to_scan(scan_to_unscanned(params_s))
    jax.tree.map(np.testing.assert_array_equal, roundtrip, params_s)


def _value_and_grad(model, params, image):
    def loss(p):
        out, _ = model.apply({"params": p}, image)
        return jnp.sum(out**2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan,policy", [(False, "nothing_saveable"), (True, "dots_saveable")])
def test_remat_same_output_and_grad(models, image, scan, policy):
    model, params = models("cappa", pool_type="gap", scan=scan)
    model_r = make("cappa", pool_type="gap", scan=scan, remat_policy=policy)
    v0, g0 = _value_and_grad(model, params, image)
    v1, g1 = _value_and_grad(model_r, params, image)
    np.testing.assert_allclose(v0, v1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_unknown_remat_policy_raises(image):
    with pytest.raises(ValueError, match="remat_policy"):
        init(make(remat_policy="bogus"))


@pytest.mark.parametrize("family", ["bv", "cappa"])
def test_bf16_compute(models, image, family):
    model, params = models(family, pool_type="map")
    model16 = make(family, pool_type="map", dtype=jnp.bfloat16)
    params16 = init(model16)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params16))
    out32 = model.apply({"params": params}, image)[0]
    out16 = model16.apply({"params": params}, image)[0]
    assert out16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32))
    assert err.max() < 0.1 * np.abs(np.asarray(out32)).max() + 0.05


def test_dropout(models, image):
    model, params = models("bv", pool_type="gap", dropout=0.3)
    eval_out = model.apply({"params": params}, image)[0]
    t1 = model.apply({"params": params}, image, train=True, rngs={"dropout": jax.random.key(1)})[0]
    t2 = model.apply({"params": params}, image, train=True, rngs={"dropout": jax.random.key(2)})[0]
    assert not np.allclose(t1, eval_out, atol=1e-4)
    assert not np.allclose(t1, t2, atol=1e-4)
    # no dropout: train == eval, no rng needed
    model0, params0 = models("bv", pool_type="gap")
    np.testing.assert_allclose(
        model0.apply({"params": params0}, image, train=True)[0],
        model0.apply({"params": params0}, image)[0],
        rtol=1e-6,
    )


# ---------------------------------------------------------------- variants and counts


def test_decode_variant():
    assert decode_variant("Ti/16") == dict(
        width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=(16, 16)
    )
    assert decode_variant("L/14")["patch_size"] == (14, 14)
    assert decode_variant("g/14")["width"] == 1408
    assert decode_variant("G/14")["depth"] == 48
    assert "patch_size" not in decode_variant("S")
    with pytest.raises(ValueError):
        decode_variant("Q/16")


def test_vit_b16_parameter_count():
    model = ViT(**decode_variant("B/16"), pool_type="tok", num_classes=1000)
    assert count(model, 224) == 86_567_656


def test_cappa_l16_parameter_count():
    kw = {**decode_variant("L/16"), "mlp_dim": 3072}
    model = ViT(
        **kw,
        norm="rmsnorm",
        normformer=True,
        mlp_type="geglu",
        use_bias=False,
        num_registers=8,
        pool_type="none",
        scan=True,
    )
    # 786,432 stem + 262,144 posemb + 8,192 registers + 24 * 13,637,632 blocks + 1,024 final norm
    assert count(model, 256) == 328_360_960


def test_sincos_posemb_known_values():
    """Row-major tokens; [sin(x w), cos(x w), sin(y w), cos(y w)] with w from 1 down to 1/10000."""
    pe = posemb_sincos_2d(2, 3, 8)[0]
    omega = np.array([1.0, 1e-4])  # width 8: 2 frequencies, the first 1 and the last 1/temperature.
    for token, (y, x) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]):
        expected = np.concatenate(
            [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
        )
        np.testing.assert_allclose(pe[token], expected, rtol=1e-6, atol=1e-7)

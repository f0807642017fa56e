"""Zero-shot classification by embeddings and image<->text retrieval (tasks/retrieval_eval.py, tasks/zeroshot.py):
recall@k against a constructed case with known ranks and a brute-force sort, both evaluators end to end on
scenes/tiny over 8 devices against numpy, template ensembling, file parsing, and `cappa zeroshot` on a real
SigLiT run."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pretrain import runs, scoring
from tasks import retrieval_eval, zeroshot
from transfer import cli, contracts, input_pipeline, metrics, pp_text, sharding, train
from transfer.datasets import scenes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES_CLASSES = "configs/zeroshot/scenes_classes.txt"
SCENES_TEMPLATES = "configs/zeroshot/scenes_templates.txt"
MAX_LEN = 24


# ---------------------------------------------------------------------------------------------- references
def brute_force_recalls(sim: np.ndarray, owner: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Full sort of every row and column (stable: ties rank the lower index first)."""
    num_images = sim.shape[0]
    i2t_order = np.argsort(-sim, axis=1, kind="stable")  # [I, T] caption indices, best first
    i2t_rank = np.array(
        [np.flatnonzero(owner[i2t_order[i]] == i).min(initial=10**9) for i in range(num_images)]
    )
    t2i_order = np.argsort(-sim.T, axis=1, kind="stable")  # [T, I]
    t2i_rank = np.array(
        [np.flatnonzero(row == o)[0] for row, o in zip(t2i_order, owner, strict=True)]
    )
    has = np.isin(np.arange(num_images), owner)
    out = {}
    for k in ks:
        out[f"i2t_recall@{k}"] = float(np.mean(i2t_rank[has] < k))
        out[f"t2i_recall@{k}"] = float(np.mean(t2i_rank < k))
    return out


def table_block(table: np.ndarray):
    """A `block` function whose "embeddings" are row / column indices into a fixed similarity table."""

    @jax.jit
    def block(rows, cols, num_rows, num_cols):
        sim = jnp.asarray(table)[rows[:, 0]][:, cols[:, 0]]
        return retrieval_eval.block_top_k(sim, num_rows, num_cols, 10)

    def call(images, texts, num_rows, num_cols, k):
        assert k == 10
        return block(images.astype(np.int32), texts.astype(np.int32), num_rows, num_cols)

    return call


def recalls_of_table(table, owner, image_chunk, text_chunk, ks=(1, 5, 10)):
    num_images, num_texts = table.shape
    images = np.arange(num_images)[:, None]
    texts = np.arange(num_texts)[:, None]
    block = table_block(table)
    return retrieval_eval.retrieval_recalls(
        block, images, texts, owner, image_chunk, text_chunk, ks
    )


# ---------------------------------------------------------------------------------------------- recall@k
def test_recall_known_ranks():
    """Image i's first caption sits at rank r_i of its row and image i at rank r_i of that caption's
    column; every second caption scores the same low value for all images, so its image's rank is the
    image's index (ties: lower index first)."""
    n = 24
    ranks = np.array(
        [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 20, 23, 0, 4, 9, 10, 1, 5]
    )
    dist = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n  # dist[i, j] = (j - i) mod n
    good = -dist.astype(np.float32)
    good[np.arange(n), np.arange(n)] = -ranks - 0.5
    table = np.concatenate([good, np.full((n, n), -100.0, np.float32)], axis=1)  # captions 0..2n-1
    owner = np.concatenate([np.arange(n), np.arange(n)])
    want = {}
    for k in (1, 5, 10):
        want[f"i2t_recall@{k}"] = float(np.mean(ranks < k))
        want[f"t2i_recall@{k}"] = float((np.sum(ranks < k) + min(k, n)) / (2 * n))
    assert want["i2t_recall@1"] == 3 / 24 and want["t2i_recall@1"] == (3 + 1) / 48
    assert brute_force_recalls(table, owner) == want
    for image_chunk, text_chunk in ((24, 48), (8, 5), (5, 7), (1, 48)):
        got = recalls_of_table(table, owner, image_chunk, text_chunk)
        assert got == pytest.approx(want, abs=1e-12), (image_chunk, text_chunk)


def test_recall_matches_brute_force_with_ties():
    """Random scores from 4 values (many ties), 1-3 captions per image, one image without captions."""
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(1, 17), rng.integers(1, 4, 16))  # image 0 has no caption
    table = rng.integers(0, 4, (17, len(owner))).astype(np.float32)
    table[owner, np.arange(len(owner))] += rng.integers(0, 2, len(owner))  # some true pairs ahead
    want = brute_force_recalls(table, owner)
    assert 0 < want["i2t_recall@1"] < want["i2t_recall@5"] < 1
    for image_chunk, text_chunk in ((17, len(owner)), (4, 6), (3, 64)):
        got = recalls_of_table(table, owner, image_chunk, text_chunk)
        assert got == pytest.approx(want, abs=1e-12), (image_chunk, text_chunk)


def test_recall_with_fewer_candidates_than_k():
    table = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4]], np.float32)
    owner = np.array([1, 0, 1])
    got = recalls_of_table(table, owner, 2, 2)
    assert got == brute_force_recalls(table, owner)
    assert got["i2t_recall@5"] == got["t2i_recall@10"] == 1.0


def test_first_texts_truncates_and_pads():
    import tensorflow as tf

    from transfer import pp

    op = pp.get_op("first_texts")(key="captions/text", n=3)
    long = op({"captions/text": tf.constant(["a", "b", "c", "d"])})["texts"].numpy().tolist()
    short = op({"captions/text": tf.constant(["a"])})["texts"].numpy().tolist()
    assert long == [b"a", b"b", b"c"] and short == [b"a", b"", b""]
    with pytest.raises(ValueError, match="must be a sequence of strings"):
        op({"captions/text": tf.constant("a")})


# ---------------------------------------------------------------------------------------------- ensembles
def test_ensemble_averages_then_renormalises():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(3 * 5, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = zeroshot.ensemble_templates(emb, 3)
    per_class = [np.mean([emb[t * 5 + c] for t in range(3)], axis=0) for c in range(5)]
    want = np.stack([v / np.linalg.norm(v) for v in per_class])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    assert np.linalg.norm(np.mean(emb.reshape(3, 5, 4), 0), axis=1).max() < 0.99  # renorm mattered


def test_class_embeddings_batches_like_one_call():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(50, 6))
    tokens = rng.integers(1, 50, (2 * 7, 3)).astype(np.int32)
    calls = []

    def embed(chunk):
        calls.append(chunk.shape)
        return table[chunk].sum(1)

    got = zeroshot.class_embeddings(embed, tokens, 2, 4, pad_id=0)
    assert calls == [(4, 3)] * 4  # 14 prompts: 4 fixed-size calls, the last padded
    np.testing.assert_allclose(got, zeroshot.ensemble_templates(table[tokens].sum(1), 2), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- files
def test_shipped_files_parse():
    assert zeroshot.read_class_names(SCENES_CLASSES) == list(scenes.LABEL_NAMES)
    assert len(zeroshot.read_templates(SCENES_TEMPLATES)) >= 4
    generic = zeroshot.read_templates("configs/zeroshot/generic_templates.txt")
    assert len(generic) >= 16 and all(t.count("{}") == 1 for t in generic)
    # Relative paths resolve from the repository root when not found from the working directory.
    assert zeroshot.resolve_path(SCENES_CLASSES) in (
        SCENES_CLASSES,
        os.path.join(REPO, SCENES_CLASSES),
    )


@pytest.mark.parametrize(
    "content, match",
    [
        ("a photo of a\n", "must contain '{}' exactly once"),
        ("a {} and a {}\n", "must contain '{}' exactly once"),
        ("a {} {0}\n", "no other braces"),
        ("", "has no entries"),
        ("# only a comment\n\n   \n", "has no entries"),
    ],
)
def test_template_file_errors(tmp_path, content, match):
    path = tmp_path / "templates.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        zeroshot.read_templates(str(path))


def test_class_file_errors(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"repeated class names \['cat'\]"):
        zeroshot.read_class_names(str(path))
    path.write_text("\n")
    with pytest.raises(ValueError, match="has no entries"):
        zeroshot.read_class_names(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zeroshot.read_class_names(str(tmp_path / "missing.txt"))


def test_file_lines_are_stripped_and_comments_skipped(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("# header\n  a photo of a {}.  \n\n#a {} skipped\nart of the {}\n")
    assert zeroshot.read_templates(str(path)) == ["a photo of a {}.", "art of the {}"]


# ---------------------------------------------------------------------------------------------- evaluators
class FakeTask:
    """Texts: a fixed random projection of their bag of tokens. Images: a linear map `params["img_proj"]` of
    their 4x4-subsampled pixels (the fixture fits it so zero-shot accuracy is far from chance)."""

    text_max_len = MAX_LEN
    pad_id = 0

    def __init__(self, vocab_size: int, dim: int = 8):
        rng = np.random.default_rng(3)
        self.txt_proj = jnp.asarray(rng.normal(size=(vocab_size, dim)), jnp.float32)
        self.vocab_size = vocab_size

    @staticmethod
    def features(images):
        return images[:, ::16, ::16, :].reshape(images.shape[0], -1)

    @staticmethod
    def _normalize(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def embed_images(self, params, images):
        return self._normalize(self.features(images) @ params["img_proj"])

    def embed_texts(self, params, tokens):
        counts = jax.nn.one_hot(tokens, self.vocab_size) * (tokens != self.pad_id)[..., None]
        return self._normalize(jnp.sum(counts, axis=1) @ self.txt_proj)

    def similarity(self, params, image_repr, text_emb):
        return image_repr @ text_emb.T


def numpy_class_embeddings(task, tok):
    """The scenes classes x templates prompts embedded one by one; mean over templates, re-normalised."""
    templates = zeroshot.read_templates(SCENES_TEMPLATES)
    prompts = [t.format(n) for t in templates for n in scenes.LABEL_NAMES]
    text = np.asarray(task.embed_texts(None, tok.encode(prompts, MAX_LEN)))
    text = text.reshape(len(templates), 42, -1).mean(0)
    return text / np.linalg.norm(text, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def fake(data_dir, scenes_tokenizer):
    """(config, task, params, mesh, batch sharding, param shardings) over a 2x4 mesh."""
    tok = pp_text.get_tokenizer(scenes_tokenizer.path)
    config = ml_collections.ConfigDict(
        dict(
            task="fake",
            tokenizer=scenes_tokenizer.path,
            input=dict(
                data=dict(name="scenes/tiny", split="train", data_dir=data_dir),
                batch_size=16,
                pp="decode|value_range(-1, 1)",
            ),
        )
    )
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    batch_sh = sharding.batch_sharding(mesh, sharding.batch_axes(mesh))
    task = FakeTask(tok.vocab_size)
    images, _, labels = _split(data_dir, "train")
    target = numpy_class_embeddings(task, tok)[labels]  # least squares: images -> their class text
    proj = np.linalg.lstsq(np.asarray(task.features(images)), target, rcond=None)[0]
    params = {"img_proj": jnp.asarray(proj, jnp.float32)}
    param_sh = {"img_proj": sharding.replicated(mesh)}
    return config, task, params, mesh, batch_sh, param_sh


def _evaluator(fake, cls, eval_cfg):
    config, task, params, mesh, batch_sh, param_sh = fake
    with jax.set_mesh(mesh):
        ev = cls(eval_cfg, contracts.EvalContext(config, task, mesh, batch_sh, param_sh))
        return ev, (lambda: ev.run(params))


def _split(data_dir, split):
    """Images in [-1, 1], captions and labels of a scenes/tiny split, read straight from TFDS."""
    builder = input_pipeline.get_builder(
        {"name": "scenes/tiny", "split": split, "data_dir": data_dir}
    )
    ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    examples = list(ds)
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1
    captions = [[t.decode() for t in e["captions"]["text"]] for e in examples]
    return images, captions, np.array([e["label"] for e in examples])


def test_zeroshot_embed_matches_numpy_argmax(fake, data_dir, scenes_tokenizer):
    config, task, params = fake[:3]
    ev, run = _evaluator(
        fake,
        retrieval_eval.ZeroShotEmbedEvaluator,
        dict(
            type="zeroshot_embed",
            pp="decode|value_range(-1, 1)|keep('image', 'label')",
            class_names_file=SCENES_CLASSES,
            templates_file=SCENES_TEMPLATES,
            text_batch_size=40,
        ),
    )
    got = run()
    images, _, labels = _split(data_dir, "train")
    text = numpy_class_embeddings(task, pp_text.get_tokenizer(scenes_tokenizer.path))
    sim = np.asarray(task.embed_images(params, images)) @ text.T
    top5 = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    want1 = np.mean(np.argmax(sim, axis=1) == labels)
    want5 = np.mean(np.any(top5 == labels[:, None], axis=1))
    assert len(labels) == 64 and 1 > want5 > want1 > 0.1  # non-trivial numbers to compare
    assert got["prec@1"] == pytest.approx(want1) and got["prec@5"] == pytest.approx(want5)
    assert got["classes"] == 42


class MixtureTask(FakeTask):
    """Like Llip: an image is K=2 tokens [B, 2, D] and `similarity` mixes them per (image, text) pair."""

    def embed_images(self, params, images):
        flipped = images[:, ::-1]
        return jnp.stack(
            [super().embed_images(params, images), super().embed_images(params, flipped)], 1
        )

    def similarity(self, params, image_repr, text_emb):
        return jnp.max(jnp.einsum("bkd,nd->bnk", image_repr, text_emb), axis=-1)


@pytest.mark.parametrize("mixture", [False, True])
def test_retrieval_matches_brute_force(fake, data_dir, scenes_tokenizer, mixture):
    config, task, params = fake[:3]
    if mixture:
        task = MixtureTask(task.vocab_size)
        fake = (config, task, *fake[2:])
    ev, run = _evaluator(
        fake,
        retrieval_eval.RetrievalEvaluator,
        dict(type="retrieval", pp="decode|value_range(-1, 1)", max_captions=4, text_chunk=48),
    )
    got = run()
    images, captions, _ = _split(data_dir, "train")
    tok = pp_text.get_tokenizer(scenes_tokenizer.path)
    texts = [c for caps in captions for c in caps[:4]]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps[:4]])
    img = np.asarray(task.embed_images(params, images))
    txt = np.asarray(task.embed_texts(params, tok.encode(texts, MAX_LEN)))
    sim = np.asarray(task.similarity(params, img, txt))
    assert sim.shape == (64, 256) and (img.ndim == 3) == mixture
    want = brute_force_recalls(sim, owner)
    assert got.pop("images") == 64 and got.pop("texts") == 256
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < want["t2i_recall@1"] < want["t2i_recall@10"] < 1


def test_evaluator_config_errors(fake):
    base = dict(type="zeroshot_embed", pp="decode|value_range(-1, 1)")
    cls = retrieval_eval.ZeroShotEmbedEvaluator
    with pytest.raises(ValueError, match="Unknown keys \\['templates_fil'\\]"):
        _evaluator(fake, cls, dict(base, templates_fil="x"))
    with pytest.raises(ValueError, match="exactly one of class_names"):
        _evaluator(fake, cls, base)
    with pytest.raises(ValueError, match="not both"):
        _evaluator(
            fake,
            cls,
            dict(base, class_names=["a", "b"], templates=["{}"], templates_file=SCENES_TEMPLATES),
        )
    with pytest.raises(ValueError, match="exactly once"):
        _evaluator(fake, cls, dict(base, class_names=["a", "b"], templates=["a photo"]))
    with pytest.raises(ValueError, match="needs .* tokens"):  # a prompt would be truncated
        _evaluator(fake, cls, dict(base, class_names=["a " * 40], max_len=8))
    ret = dict(type="retrieval", pp="decode|value_range(-1, 1)")
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        _evaluator(fake, retrieval_eval.RetrievalEvaluator, dict(ret, image_chunk=12))
    with pytest.raises(ValueError, match="ks must be positive"):
        _evaluator(fake, retrieval_eval.RetrievalEvaluator, dict(ret, ks=(0, 5)))


# ---------------------------------------------------------------------------------------------- SigLiT
@pytest.fixture(scope="module")
def siglit_run(data_dir, scenes_tokenizer, tmp_path_factory):
    """A tiny SigLiT trained 4 steps from a random frozen tower, with both evaluators in the loop."""
    caption_pp = (
        "decode|value_range(-1, 1)|flatten|choice(key='captions/text', outkey='text')"
        f"|tokenize(max_len={MAX_LEN}, model='{scenes_tokenizer.path}', key='text', outkey='labels')"
        "|keep('image', 'labels')"
    )
    config = ml_collections.ConfigDict(
        dict(
            task="tasks.siglit",
            tokenizer=scenes_tokenizer.path,
            input=dict(
                data=dict(name="scenes/tiny", split="train", data_dir=data_dir),
                batch_size=16,
                pp=caption_pp,
                shuffle_buffer_size=16,
            ),
            model=dict(
                img=dict(
                    width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=16, num_registers=2
                ),
                txt=dict(
                    vocab_size=pp_text.get_tokenizer(scenes_tokenizer.path).vocab_size,
                    depth=1,
                    mlp_dim=64,
                    max_len=MAX_LEN,
                ),
            ),
            total_steps=4,
            lr=1e-3,
            log_training_steps=2,
            ckpt_steps=4,
            evals=dict(
                zs=dict(
                    type="zeroshot_embed",
                    data=dict(split="validation"),
                    pp="decode|value_range(-1, 1)|keep('image', 'label')",
                    class_names_file=SCENES_CLASSES,
                    templates_file=SCENES_TEMPLATES,
                ),
                ret=dict(
                    type="retrieval", data=dict(split="validation"), pp="decode|value_range(-1, 1)"
                ),
            ),
        )
    )
    config, _ = train.prepare_config(config)
    workdir = str(tmp_path_factory.mktemp("siglit"))
    train.train(config, workdir)
    return workdir


def test_siglit_loop_reports_both_evaluators(siglit_run):
    rows = metrics.read_jsonl(os.path.join(siglit_run, "metrics.jsonl"))
    last = [r for r in rows if "zs/prec@1" in r][-1]
    assert 0 <= last["zs/prec@1"] <= last["zs/prec@5"] <= 1 and last["zs/classes"] == 42
    ret = [r for r in rows if "ret/i2t_recall@1" in r][-1]
    assert ret["ret/images"] == 16 and ret["ret/texts"] == 80
    for way in ("i2t", "t2i"):
        assert (
            ret[f"ret/{way}_recall@1"] <= ret[f"ret/{way}_recall@5"] <= ret[f"ret/{way}_recall@10"]
        )
    # The task's finalize hook wrote the table a person reads: the last value of each metric.
    with open(os.path.join(siglit_run, "siglit.md")) as f:
        table = f.read()
    assert f"| zs/prec@1 | {last['step']} | {last['zs/prec@1']:.4f} |" in table
    assert f"| ret/i2t_recall@5 | {ret['step']} | {ret['ret/i2t_recall@5']:.4f} |" in table


def test_cli_prints_sigmoid_probabilities_of_top_classes(siglit_run, data_dir, tmp_path, capsys):
    from PIL import Image

    images, _, _ = _split(data_dir, "test")
    paths = []
    for i in range(2):
        path = str(tmp_path / f"img{i}.png")
        Image.fromarray(((images[i] + 1) * 127.5).round().astype(np.uint8)).save(path)
        paths.append(path)
    argv = [
        "zeroshot",
        "--checkpoint",
        siglit_run,
        "--classes",
        SCENES_CLASSES,
        "--templates",
        SCENES_TEMPLATES,
        *paths,
        "--top",
        "3",
        "--json",
    ]
    assert cli.main(argv) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    # Reference: the run's own functions on the same pixels, the ensemble and the logits in numpy.
    run = runs.load_run(siglit_run)
    templates = zeroshot.read_templates(SCENES_TEMPLATES)
    prompts = scoring.class_prompts(list(scenes.LABEL_NAMES), templates)
    text = np.asarray(run.task.embed_texts(run.params, run.tokenizer.encode(prompts, MAX_LEN)))
    text = text.reshape(len(templates), 42, -1).mean(0)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image_repr = run.task.embed_images(run.params, runs.load_images(paths, 64))
    sim = np.asarray(run.task.similarity(run.params, image_repr, jnp.asarray(text)))
    logits = np.exp(float(run.params["t"])) * sim + float(run.params["b"])
    probs = 1 / (1 + np.exp(-logits))
    assert [g["image"] for g in got] == paths
    for g, p in zip(got, probs, strict=True):
        best = np.argsort(-p, kind="stable")[:3]
        assert [c["name"] for c in g["classes"]] == [scenes.LABEL_NAMES[i] for i in best]
        np.testing.assert_allclose([c["prob"] for c in g["classes"]], p[best], rtol=1e-4)


def test_cli_errors(siglit_run, tmp_path, capsys):
    bad = tmp_path / "t.txt"
    bad.write_text("no placeholder\n")
    argv = [
        "zeroshot",
        "--checkpoint",
        siglit_run,
        "--classes",
        SCENES_CLASSES,
        "--templates",
        str(bad),
        "x.png",
    ]
    assert cli.main(argv) == 2
    assert "must contain '{}' exactly once" in capsys.readouterr().err
    argv = ["zeroshot", "--checkpoint", siglit_run, "--classes", SCENES_CLASSES, "missing.png"]
    assert cli.main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_text_output_is_one_line_per_class(monkeypatch, capsys):
    canned = [
        {
            "image": "a.png",
            "classes": [{"name": "red circle", "prob": 0.91234}, {"name": "x", "prob": 0.5}],
        }
    ]
    monkeypatch.setattr(zeroshot, "classify_files", lambda args: canned)
    assert cli.main(["zeroshot", "--checkpoint", "w", "--classes", "c.txt", "a.png"]) == 0
    assert capsys.readouterr().out.splitlines() == ["a.png\tred circle\t0.9123", "a.png\tx\t0.5000"]
    assert (
        cli.main(["zeroshot", "--checkpoint", "w", "--classes", "c.txt", "a.png", "--top", "0"])
        == 2
    )

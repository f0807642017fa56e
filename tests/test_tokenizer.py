"""SentencePiece tokenizer: layout conventions, training, dataset captions, the `tokenize` pp op
inside the real input pipeline (incl. dropping empty captions) and `cappa tokenizer`."""

import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

from transfer import input_pipeline, pp, pp_text, tokenizer
from transfer.tokenizer import Tokenizer

VOCAB = 150
CAPTIONS = [" red  circle ", "", "a blue star", "   ", "two green crosses", "\t", "a cat", "x"]


class CappaTestCaptions(tfds.core.GeneratorBasedBuilder):
    """One caption per example; some are empty or blank (they must be dropped by `tokenize`)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate(CAPTIONS):
            yield i, {"text": text, "id": i}


@pytest.fixture(scope="module")
def scenes_cfg(data_dir):
    return {"name": "scenes/tiny", "split": "train", "data_dir": data_dir}


@pytest.fixture(scope="module")
def corpus(scenes_cfg):
    return list(tokenizer.captions_from_dataset(scenes_cfg))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def tok(corpus, model_dir):
    return tokenizer.train_tokenizer(corpus, str(model_dir / "scenes.model"), VOCAB)


# ----------------------------------------------------------------------------- dataset captions


def test_captions_from_dataset_reads_nested_lists_and_literal_slash_keys(corpus, scenes_cfg):
    builder = input_pipeline.get_builder(scenes_cfg)
    examples = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
    expected = [t.decode() for ex in examples for t in ex["captions"]["text"]]
    assert corpus == expected and len(corpus) > len(examples)
    # "image/filename" is one feature whose name contains "/", not a nested path.
    names = list(tokenizer.captions_from_dataset(scenes_cfg, key="image/filename", limit=3))
    assert names == [ex["image/filename"].decode() for ex in examples[:3]]
    with pytest.raises(ValueError, match="no feature 'captions/txt'.*captions/text"):
        next(tokenizer.captions_from_dataset(scenes_cfg, key="captions/txt"))


# ----------------------------------------------------------------------------- training


def test_trained_model_uses_our_ids_and_is_deterministic(tok, corpus, model_dir):
    sp = tok.processor
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    assert 10 < tok.vocab_size <= VOCAB
    again = tokenizer.train_tokenizer(corpus, str(model_dir / "again.model"), VOCAB)
    assert open(again.path, "rb").read() == open(tok.path, "rb").read()
    smaller = tokenizer.train_tokenizer(corpus, str(model_dir / "small.model"), VOCAB // 2)
    assert open(smaller.path, "rb").read() != open(tok.path, "rb").read()
    assert not [f for f in os.listdir(model_dir) if ".tmp-" in f]  # Atomic writes clean up.


def test_small_corpus_caps_vocab_and_bad_requests_fail_clearly(model_dir):
    texts = [f"sentence number {i % 13} about shapes" for i in range(300)]
    small = tokenizer.train_tokenizer(texts, str(model_dir / "syn.model"), 5000, model_type="bpe")
    assert small.vocab_size < 5000  # hard_vocab_limit=False: fewer pieces instead of failing.
    with pytest.raises(ValueError, match="Vocabulary size is smaller"):
        tokenizer.train_tokenizer(texts, str(model_dir / "tiny.model"), 5)
    with pytest.raises(ValueError, match="iterator is empty"):
        tokenizer.train_tokenizer([], str(model_dir / "empty.model"), 100)
    with pytest.raises(ValueError, match="model_type"):
        tokenizer.train_tokenizer(texts, str(model_dir / "x.model"), 100, model_type="wordpiece")
    assert not os.path.exists(model_dir / "tiny.model")


# ----------------------------------------------------------------------------- encode / decode


def test_round_trip_gives_the_whitespace_normalised_text(tok, corpus):
    ids = tok.encode(corpus, 128)
    assert ids.dtype == np.int32 and ids.shape == (len(corpus), 128)
    assert tok.decode(ids) == [" ".join(t.split()) for t in corpus]


def test_batched_and_per_text_encoding_give_the_same_ids(tok, corpus):
    """Below `_BATCH_MIN` texts encode calls SentencePiece once per text, above it once per batch."""
    from transfer import tokenizer as tokenizer_lib

    texts = corpus[: tokenizer_lib._BATCH_MIN * 2]
    assert len(texts) >= tokenizer_lib._BATCH_MIN
    batched = tok.encode(texts, 24)
    one_by_one = np.concatenate([tok.encode(t, 24) for t in texts])
    np.testing.assert_array_equal(batched, one_by_one)
    np.testing.assert_array_equal(tok.encode(texts[:3], 24), batched[:3])


def test_layout_is_pieces_eos_pad(tok, corpus):
    for text in corpus[:20]:
        pieces = tok.processor.encode(text)
        row = tok.encode(text, len(pieces) + 3)[0]
        assert row.tolist() == pieces + [1, 0, 0]
        short = tok.encode(text.encode(), 4)[0]  # bytes as tf.data hands them over
        assert short.tolist() == pieces[:3] + [1]


def test_decode_stops_at_eos_and_ignores_pad(tok):
    a, b, c = tok.processor.encode("red circle")[:3]
    assert tok.decode([a, 0, b, 1, c, 0]) == tok.processor.decode([[a, b]])
    assert tok.decode([[a, b, c], [0, 0, 0]]) == [tok.processor.decode([a, b, c]), ""]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([a, tok.vocab_size])


def test_model_without_pad_piece_needs_explicit_pad_id(corpus, model_dir):
    model = io.BytesIO()  # SentencePiece's defaults: unk=0, bos=1, eos=2, no pad.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=80, minloglevel=2
    )
    path = model_dir / "nopad.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="no pad piece; pass pad_id"):
        Tokenizer(str(path))
    tok = Tokenizer(str(path), pad_id=1)  # The unused BOS piece.
    assert (tok.pad_id, tok.eos_id) == (1, 2)
    pieces = tok.processor.encode(corpus[0])
    assert tok.encode(corpus[0], len(pieces) + 3)[0].tolist() == pieces + [2, 1, 1]
    with pytest.raises(ValueError, match="must differ"):
        Tokenizer(str(path), pad_id=2)


def test_missing_or_corrupt_model_fails_clearly(model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(str(model_dir / "missing.model"))
    bad = model_dir / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer(str(bad))


# ----------------------------------------------------------------------------- pp op


def test_tokenize_op_in_the_input_pipeline_matches_encode(tok, data_dir):
    pp_string = (
        "flatten|choice(key='captions/text', outkey='text')|"
        f"tokenize(max_len=8, model={tok.path!r}, key='text', outkey='labels')|keep('text', 'labels')"
    )
    cfg = {
        "data": {"name": "scenes/tiny", "split": "train", "data_dir": data_dir},
        "pp": pp_string,
        "batch_size": 16,
        "shuffle_buffer_size": 0,
    }
    it = input_pipeline.TrainIterator(cfg, seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (16, 8)
    np.testing.assert_array_equal(batch["labels"], tok.encode(batch["text"], 8))
    assert (batch["labels"][:, -1] != 0).any()  # Some captions were truncated with EOS last.
    assert it.stats()["input/skipped"] == 0


def test_empty_captions_are_dropped_and_counted(tok, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("captions"))
    CappaTestCaptions(data_dir=path).download_and_prepare()
    cfg = {
        "data": {"name": "cappa_test_captions", "split": "train", "data_dir": path},
        "pp": f"tokenize(6, {tok.path!r}, outkey='labels')|keep('id', 'labels', 'text')",
    }
    batches = input_pipeline.eval_batches(cfg, batch_size=8, process_index=0, process_count=1)
    batch = next(batches)
    kept = [i for i, t in enumerate(CAPTIONS) if t.strip()]
    real = batch["_mask"] == 1
    assert sorted(batch["id"][real].tolist()) == kept  # TFDS stores examples in hashed order.
    np.testing.assert_array_equal(batch["labels"][real], tok.encode(batch["text"][real], 6))
    assert batches.stats()["input/skipped"] == len(CAPTIONS) - len(kept)
    op = tf.function(pp.parse(f"tokenize(6, {tok.path!r})"))
    for blank in ("  ", "\u3000"):  # ASCII blank (graph check), blank after NFKC (in Python).
        with pytest.raises(tf.errors.InvalidArgumentError, match="empty caption"):
            op({"text": tf.constant(blank)})
        with pytest.raises(tf.errors.InvalidArgumentError, match="empty caption"):
            op({"text": tf.constant(["a red circle", blank])})  # One blank fails the vector.


@pytest.mark.parametrize("image_pp", ["decode", "decode|resize(32)"])
def test_cached_caption_pp_gives_the_uncached_batches(tok, scenes_cfg, image_pp):
    """configs' caption_pp: every caption tokenized before `cache`, then a choice of the ids, draws
    what choosing the text and tokenizing it draws (same pp position), over 2+ epochs of scenes/tiny."""
    batches = {}
    for cached in (True, False):
        cfg = dict(
            data=dict(scenes_cfg),
            pp=pp_text.caption_pp(image_pp, tok.path, 20, cached=cached),
            batch_size=16,
            shuffle_buffer_size=100,
        )
        it = input_pipeline.TrainIterator(cfg, seed=4, process_index=0, process_count=1)
        assert "|cache|" in cfg["pp"] if cached else "cache" not in cfg["pp"]
        batches[cached] = [next(it) for _ in range(2 * it.epoch_size // 16 + 1)]
    for a, b in zip(batches[True], batches[False], strict=True):
        assert sorted(a) == ["image", "labels"] == sorted(b)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_tokenize_op_on_a_vector_gives_each_string_its_scalar_ids(tok):
    """All captions tokenized at once (a cached pp prefix) == one caption at a time."""
    op = tf.function(pp.parse(f"tokenize(6, {tok.path!r}, outkey='ids')"))
    texts = [t for t in CAPTIONS if t.strip()]
    rows = op({"text": tf.constant(texts)})["ids"].numpy()
    assert rows.shape == (len(texts), 6)
    for text, row in zip(texts, rows, strict=True):
        np.testing.assert_array_equal(row, op({"text": tf.constant(text)})["ids"].numpy())
    np.testing.assert_array_equal(rows, tok.encode(texts, 6))


def test_tokenize_op_rejects_bad_setups_at_build_time(tok):
    with pytest.raises(FileNotFoundError):
        pp.parse("tokenize(8, 'no/such.model')")
    with pytest.raises(ValueError, match="vector of strings.*choice"):
        pp.parse(f"tokenize(8, {tok.path!r})")({"text": tf.constant([["a", "b"]])})
    assert pp_text.get_tokenizer(tok.path) is pp_text.get_tokenizer(tok.path)  # Cached.


# ----------------------------------------------------------------------------- CLI


def test_cli_train_writes_a_loadable_model_and_prints_json(tok, corpus, data_dir, tmp_path, capsys):
    out = str(tmp_path / "cli.model")
    argv = ["train", "--dataset", "scenes/tiny", "--data_dir", data_dir, "--key", "captions/text"]
    assert tokenizer.main(argv + ["--vocab_size", str(VOCAB), "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"vocab_size": tok.vocab_size, "captions": len(corpus), "path": out}
    assert open(out, "rb").read() == open(tok.path, "rb").read()  # Same corpus, same model.

    assert tokenizer.main(["encode", "--model", out, "--max_len", "5", corpus[0], "red"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == tok.encode([corpus[0], "red"], 5).tolist()
    ids = [str(i) for i in tok.encode(corpus[1], 128)[0]]
    assert tokenizer.main(["decode", "--model", out, *ids]) == 0
    assert json.loads(capsys.readouterr().out) == " ".join(corpus[1].split())
    assert tokenizer.main(["encode", "--model", str(tmp_path / "none.model"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err

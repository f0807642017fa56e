"""SentencePiece tokenizer for captions: load any `.model`, train one offline, `cappa tokenizer`.

Conventions (the text side of every task relies on them):

* A token sequence is `tokens..., EOS, pad, pad, ...`, always exactly `max_len` long. There is no
  BOS: the caption decoder starts from its own start embedding.
* Too-long captions are truncated to `max_len - 1` pieces and EOS is KEPT as the last token, so
  every sequence ends (a model always learns to stop).
* `pad_id` defaults to the model's pad piece and `eos_id` to its EOS piece. Many public models
  have no pad piece (`pad_id() == -1`): those need an explicit `pad_id`; loading them without
  one is an error rather than a silent guess. pad and EOS must differ, so `ids != pad_id` is
  the loss mask and includes EOS.
* Models we train (`train_tokenizer`, `cappa tokenizer train`) use pad=0, eos=1, unk=2, no BOS.
* `decode` stops at the first EOS and ignores pad ids anywhere, so it reads model outputs as well.

Model files are read with `tf.io.gfile`, so `gs://` paths work; training writes atomically
(temporary file, then rename) so a crash never leaves a truncated model behind.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from transfer import config as config_lib

# The ids of models we train; `Tokenizer` reads them from the model, these only feed the trainer.
TRAIN_PAD_ID, TRAIN_EOS_ID, TRAIN_UNK_ID = 0, 1, 2
MODEL_TYPES = ("unigram", "bpe", "char", "word")
_BATCH_MIN = 32  # texts from which one threaded SentencePiece call beats one call per text
# Trainer options that fix the conventions above; `train_tokenizer(**options)` may not change them.
_RESERVED_OPTIONS = ("pad_id", "eos_id", "unk_id", "bos_id", "sentence_iterator", "model_writer")


def _gfile() -> Any:
    import tensorflow as tf  # Lazy: `cappa tokenizer encode` on a local file stays quick to start.

    return tf.io.gfile


def _read_model(path: str) -> spm.SentencePieceProcessor:
    gfile = _gfile()
    if not gfile.exists(path):
        raise config_lib.MissingFileError(
            f"SentencePiece model {path!r} does not exist; train one with "
            "`cappa tokenizer train ... --out PATH.model` or point to an existing .model file."
        )
    with gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise config_lib.InputError(
            f"{path!r} ({len(data)} bytes) is not a valid SentencePiece model (a `.model` file is "
            f"expected, not the `.vocab` text file): {str(e).strip()}"
        ) from None


def _pick_id(name: str, explicit: int | None, from_model: int, vocab_size: int, path: str) -> int:
    value = from_model if explicit is None else int(explicit)
    if value < 0:
        raise config_lib.InputError(
            f"SentencePiece model {path!r} has no {name} piece; pass {name}_id explicitly "
            f"(an id in [0, {vocab_size}) that the model never produces for text, e.g. a "
            "control or unused piece)."
        )
    if value >= vocab_size:
        raise config_lib.InputError(
            f"{name}_id {value} is outside the vocabulary [0, {vocab_size}) of {path!r}"
        )
    return value


class Tokenizer:
    """A SentencePiece model with the pad/EOS conventions of the module docstring."""

    def __init__(self, path: str, pad_id: int | None = None, eos_id: int | None = None):
        self.path = str(path)
        self.processor = _read_model(self.path)
        size = self.processor.vocab_size()
        self._pad_id = _pick_id("pad", pad_id, self.processor.pad_id(), size, self.path)
        self._eos_id = _pick_id("eos", eos_id, self.processor.eos_id(), size, self.path)
        if self._pad_id == self._eos_id:
            raise config_lib.InputError(
                f"pad_id and eos_id are both {self._pad_id} for {self.path!r}; they must differ "
                "(the loss mask `ids != pad_id` has to keep EOS)."
            )

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, texts: str | bytes | Iterable[str | bytes], max_len: int) -> np.ndarray:
        """int32 [N, max_len]: pieces, EOS, pad...; truncation keeps EOS last. A single string
        gives N=1. Empty text gives a lone EOS (the `tokenize` pp op drops such examples)."""
        if max_len < 1:
            raise config_lib.InputError(f"max_len must be >= 1 (room for EOS), got {max_len}")
        if isinstance(texts, str | bytes):
            texts = [texts]
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
        out = np.full((len(texts), max_len), self._pad_id, np.int32)
        for row, pieces in zip(out, self._pieces(texts), strict=True):
            pieces = pieces[: max_len - 1]
            row[: len(pieces)] = pieces
            row[len(pieces)] = self._eos_id
        return out

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        # SentencePiece's list call runs a thread pool: ~60 us of fixed cost, 15x the encoding of
        # one short caption, which is what the `tokenize` pp op asks for per example. One call per
        # text below _BATCH_MIN texts (the same ids), the pool from there on (1.3-2.2x faster at
        # 1,000 texts here; benchmarks/caption_input.py).
        if len(texts) < _BATCH_MIN:
            return [self.processor.encode(text) for text in texts]
        return self.processor.encode(texts)

    def decode(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of [N, L] (or one [L]) id rows: each row up to its first EOS, pad ids skipped."""
        rows = np.asarray(ids, np.int64)
        if rows.ndim == 1:
            rows = rows[None]
        if rows.ndim != 2:
            raise ValueError(f"decode expects ids of shape [N, L] or [L], got {rows.shape}")
        bad = rows[(rows < 0) | (rows >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary "
                f"[0, {self.vocab_size}) of {self.path!r}"
            )
        kept = []
        for row in rows.tolist():
            if self._eos_id in row:
                row = row[: row.index(self._eos_id)]
            kept.append([i for i in row if i != self._pad_id])
        return self.processor.decode(kept)


# ----------------------------------------------------------------------------- training


def _write_atomically(path: str, data: bytes) -> None:
    gfile = _gfile()
    parent = os.path.dirname(path)
    if parent:
        gfile.makedirs(parent)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with gfile.GFile(tmp, "wb") as f:
            f.write(data)
        gfile.rename(tmp, path, overwrite=True)
    finally:
        if gfile.exists(tmp):
            gfile.remove(tmp)


def train_tokenizer(
    texts: Iterable[str],
    out_path: str,
    vocab_size: int,
    model_type: str = "unigram",
    *,
    character_coverage: float = 1.0,
    max_sentences: int | None = None,
    num_threads: int = 8,
    seed: int = 0,
    **options: Any,
) -> Tokenizer:
    """Trains a SentencePiece model on `texts` and writes it to `out_path` (pad=0, eos=1, unk=2).

    Deterministic: the same texts and arguments give a byte-identical model (`num_threads` is
    stored in the model, hence a fixed default rather than the machine's core count).
    `vocab_size` is an upper bound (`hard_vocab_limit=False`): a small corpus yields fewer
    pieces instead of failing. `character_coverage=1.0` keeps every character seen in training
    (caption corpora are small and a rare letter should not decode as unk); lower it for corpora
    with thousands of rare characters. `max_sentences` samples that many texts (seeded) to bound
    memory on huge corpora. Extra `options` go to the SentencePiece trainer (e.g.
    `normalization_rule_name="nmt_nfkc_cf"` to lower-case, `split_digits=True`).
    """
    if model_type not in MODEL_TYPES:
        raise config_lib.InputError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
    if reserved:
        raise config_lib.InputError(f"options {reserved} are fixed by the tokenizer conventions")
    iterator = iter(texts)
    first = next(iterator, None)
    if first is None:
        raise config_lib.InputError("No texts to train the tokenizer on (the iterator is empty).")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_prepend(first, iterator),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=max_sentences or 0,
            shuffle_input_sentence=True,
            pad_id=TRAIN_PAD_ID,
            eos_id=TRAIN_EOS_ID,
            unk_id=TRAIN_UNK_ID,
            bos_id=-1,
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
            **options,
        )
    except RuntimeError as e:
        raise config_lib.InputError(f"SentencePiece training failed: {str(e).strip()}") from None
    _write_atomically(out_path, model.getvalue())
    return Tokenizer(out_path)


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _lookup(example: Mapping[str, Any], key: str) -> Any:
    """`a/b/c` -> example["a"]["b"]["c"]; a literal key such as "image/filename" wins."""
    if key in example:
        return example[key]
    head, sep, rest = key.partition("/")
    while sep:
        if head in example and isinstance(example[head], Mapping):
            try:
                return _lookup(example[head], rest)
            except KeyError:
                pass
        more, sep, rest = rest.partition("/")
        head = f"{head}/{more}"
    raise KeyError(key)


def _flat_keys(example: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in example.items():
        keys += _flat_keys(v, f"{prefix}{k}/") if isinstance(v, Mapping) else [prefix + k]
    return keys


def captions_from_dataset(
    data_cfg: Mapping[str, Any], key: str = "captions/text", limit: int | None = None
) -> Iterator[str]:
    """Raw texts of feature `key` in a TFDS split (`{"name", "split", "data_dir"}`), file order.

    `a/b` addresses nested features; a list-valued feature yields each element; blank texts
    are skipped. Images stay encoded (never decoded), so this reads fast.
    """
    import tensorflow_datasets as tfds

    from transfer import input_pipeline

    builder = input_pipeline.get_builder(data_cfg)
    ds = builder.as_dataset(
        split=data_cfg["split"],
        shuffle_files=False,
        decoders=input_pipeline.encoded_images(builder.info.features),
    )
    count = 0
    for example in tfds.as_numpy(ds):
        try:
            value = _lookup(example, key)
        except KeyError:
            raise config_lib.InputError(
                f"Dataset {data_cfg['name']!r} has no feature {key!r}; "
                f"features: {_flat_keys(example)}"
            ) from None
        for text in np.asarray(value, dtype=object).reshape(-1):
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            if limit is not None and count >= limit:
                return
            if text.strip():
                count += 1
                yield text


# ----------------------------------------------------------------------------- CLI


def _train_command(args: argparse.Namespace) -> dict[str, Any]:
    data_cfg = {"name": args.dataset, "split": args.split, "data_dir": args.data_dir}
    counter = {"n": 0}

    def counted() -> Iterator[str]:
        for text in captions_from_dataset(data_cfg, args.key, args.limit):
            counter["n"] += 1
            yield text

    tok = train_tokenizer(
        counted(),
        args.out,
        args.vocab_size,
        args.model_type,
        character_coverage=args.character_coverage,
    )
    return {"vocab_size": tok.vocab_size, "captions": counter["n"], "path": args.out}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cappa tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on a TFDS text feature")
    train.add_argument("--dataset", required=True, help="TFDS name, e.g. scenes or scenes/tiny")
    train.add_argument("--split", default="train")
    train.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
    train.add_argument("--key", default="captions/text", help="text feature; a/b = nested")
    train.add_argument("--vocab_size", type=int, default=32_000, help="upper bound")
    train.add_argument("--model_type", default="unigram", choices=MODEL_TYPES)
    train.add_argument(
        "--character_coverage", type=float, default=1.0, help="< 1 maps rare chars to unk"
    )
    train.add_argument("--limit", type=int, default=None, help="use at most this many texts")
    train.add_argument("--out", required=True, help="output path, e.g. tok.model (gs:// works)")
    for name, help_ in (("encode", "print the ids of texts"), ("decode", "print the text of ids")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--model", required=True, help="SentencePiece .model file")
        cmd.add_argument("--pad_id", type=int, default=None)
        cmd.add_argument("--eos_id", type=int, default=None)
    sub.choices["encode"].add_argument("--max_len", type=int, default=None, help="pad/truncate")
    sub.choices["encode"].add_argument("texts", nargs="+")
    sub.choices["decode"].add_argument("ids", nargs="+", type=int)
    return parser


def main(argv: list[str]) -> int:
    """`cappa tokenizer {train,encode,decode}`; prints JSON (one line per result)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            print(json.dumps(_train_command(args)))
            return 0
        tok = Tokenizer(args.model, pad_id=args.pad_id, eos_id=args.eos_id)
        if args.command == "decode":
            print(json.dumps(tok.decode(args.ids)[0]))
            return 0
        for text in args.texts:
            max_len = args.max_len or len(tok.processor.encode(text)) + 1
            print(json.dumps(tok.encode(text, max_len)[0].tolist()))
        return 0
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2

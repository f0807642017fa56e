"""Caption input pipeline: SentencePiece encoding per call and the tiny CapPa pipeline's examples/s.

    .venv/bin/python benchmarks/caption_input.py [--quick] [--data_dir DIR]

Why: the `tokenize` pp op encodes one caption per example through `tf.numpy_function`, under the GIL.
SentencePiece's list call starts a thread pool whose fixed cost (~60 us) was 15x the encoding of a
short caption, so `Tokenizer.encode` calls it once per text for small inputs. This prints one JSON
object with:

* `encode_us`: `Tokenizer.encode` per call for 1, 16 and 1,000 captions, next to SentencePiece's
  list call (the pool) and one call per text, so the `_BATCH_MIN` crossover can be re-checked;
* `pipeline_examples_per_s`: `input_pipeline.TrainIterator` with the tiny CapPa's caption pp, uncached
  with and without its `tokenize` op, and as configs/cappa_tiny.py has it: decoding and tokenizing
  before a `cache` marker (the pipeline alone, no training); `pipeline_start_s`: building each
  iterator up to its first batch (the cached one decodes and tokenizes the whole split there).

The tokenizer is trained on the embedded `scenes` captions (BPE, 256 pieces, as the demo does); the
data is generated in a temporary TFDS data_dir unless `--data_dir` points at one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transfer import input_pipeline, pp_text, tokenizer  # noqa: E402

PP_IMAGE = "decode|value_range(-1, 1)|flatten|choice(key='captions/text', outkey='text')"


def _per_call_us(fn, calls: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - t0) / calls * 1e6, 1)


def encode_us(tok: tokenizer.Tokenizer, captions: list[str], quick: bool) -> dict:
    out = {}
    for n in (1, 16, 1000):
        texts = (captions * (n // len(captions) + 1))[:n]
        calls = max(2, (300 if quick else 3000) // n)
        out[str(n)] = {
            "Tokenizer.encode": _per_call_us(lambda t=texts: tok.encode(t, 32), calls),
            "sentencepiece_list_call": _per_call_us(lambda t=texts: tok.processor.encode(t), calls),
            "sentencepiece_per_text": _per_call_us(
                lambda t=texts: [tok.processor.encode(x) for x in t], calls
            ),
        }
    return out


def pipeline_examples_per_s(data: dict, model: str, batches: int) -> tuple[dict, dict]:
    """(examples/s, seconds to the first batch) per pp variant."""
    tokenize = f"|tokenize(max_len=32, model='{model}', key='text', outkey='labels')"
    variants = {
        "with_tokenize": PP_IMAGE + tokenize + "|keep('image', 'labels')",
        "without_tokenize": PP_IMAGE + "|keep('image', 'text')",
        "cached": pp_text.caption_pp("decode", model, 32, cached=True),
    }
    speed, start = {}, {}
    for name, pp in variants.items():
        cfg = {"data": data, "batch_size": 64, "pp": pp, "shuffle_buffer_size": 5_000}
        t0 = time.perf_counter()
        iterator = input_pipeline.TrainIterator(cfg, seed=0)
        next(iterator)
        start[name] = round(time.perf_counter() - t0, 2)
        for _ in range(10):  # fill the prefetch buffer and the shuffle buffer
            next(iterator)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        speed[name] = round(batches * 64 / (time.perf_counter() - t0))
    return speed, start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and batches")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: a temporary one)")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="bench_caption_input_")
    data = {"name": "scenes", "split": "train", "data_dir": args.data_dir or workdir}
    model = os.path.join(workdir, "scenes_bpe256.model")
    t_start = time.perf_counter()
    # Dataset generation and TFDS print progress to stdout; stdout is for the one JSON object.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            captions = list(tokenizer.captions_from_dataset(data))
            tok = tokenizer.train_tokenizer(captions, model, vocab_size=256, model_type="bpe")
            encode = encode_us(tok, captions[:1000], args.quick)
            pipeline, start = pipeline_examples_per_s(data, model, 30 if args.quick else 200)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "caption_input",
                "date": datetime.date.today().isoformat(),
                "cpu_count": os.cpu_count(),
                "batch_min": tokenizer._BATCH_MIN,
                "encode_us": encode,
                "pipeline_examples_per_s": pipeline,
                "pipeline_start_s": start,
                "wall_time_s": round(time.perf_counter() - t_start, 1),
            },
            indent=2,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

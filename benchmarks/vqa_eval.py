"""VQA / OCR evaluation throughput: question-prefixed greedy decoding (KV cache vs recomputation) and scoring.

    .venv/bin/python benchmarks/vqa_eval.py [--quick]

Prints one JSON object. Decoding: pretrain/prefix_lm.generate on a random model (speed does not depend on
the weights) with questions of 8-24 tokens (varied lengths, as real batches) and EOS made impossible, so
every answer runs the full `ANSWER` steps; "uncached" recomputes the packed rows at every step. Compilation
is excluded (compiled first, then timed). `questions_per_s` = questions per second of decoding. Scoring: the
official VQA accuracy (tasks/vqa_metrics.score_lists, 10 answers per question) and the OCR metrics
(tasks/ocr_metrics.score) on synthetic predictions, in questions (texts) per second.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from statistics import median

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain import cappa, prefix_lm  # noqa: E402
from tasks import ocr_metrics, vqa_metrics  # noqa: E402

QUESTION, ANSWER, EOS = 24, 8, 1
SIZES = {
    "full": dict(width=768, depth=3, num_heads=12, vocab_size=8_000, batch=32, repeats=3),
    "quick": dict(width=384, depth=2, num_heads=6, vocab_size=4_000, batch=16, repeats=2),
}
WORDS = "yes no 2 3 red blue circle square left right top bottom large small".split()


def build(size: dict):
    cfg = dict(
        dtype="float32",
        img=dict(
            cappa.MODEL_DEFAULTS["img"],
            width=size["width"],
            depth=1,
            num_heads=size["num_heads"],
            patch_size=8,
        ),
        txt=dict(
            cappa.MODEL_DEFAULTS["txt"],
            vocab_size=size["vocab_size"],
            depth=size["depth"],
            max_len=QUESTION + ANSWER,
        ),
    )
    model = cappa.Model(**cappa.model_kwargs(cfg))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (size["batch"], 64, 64, 3)).astype(np.float32)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), images[:1], jnp.zeros((1, QUESTION + ANSWER), jnp.int32)
    )["params"]

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        std = 1.0 if name == "embedding" else 0.02 if name == "bias" else x.shape[-1] ** -0.5
        return rng.normal(0.0, std, x.shape).astype(x.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    params["txt"]["head"]["bias"][EOS] = -1e9  # never ends: all ANSWER steps run
    params["txt"]["head"]["bias"][0] = -1e9  # no pad mid-answer
    question = np.zeros((size["batch"], QUESTION), np.int32)
    for row, n in zip(question, rng.integers(8, QUESTION + 1, size["batch"]), strict=True):
        row[: n - 1], row[n - 1] = rng.integers(2, size["vocab_size"], n - 1), EOS
    return model, jax.device_put(params), images, question


def measure_decode(model, params, images, question, use_cache: bool, repeats: int) -> dict:
    settings = (ANSWER, EOS, 0, None, use_cache)
    args = (params, jnp.asarray(images), jnp.asarray(question))
    t0 = time.perf_counter()
    fn = prefix_lm._compiled(model, settings).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    assert int(np.min(out["lengths"])) == ANSWER, "an answer ended early: the measurement is short"
    seconds = median(times)
    return {
        "seconds": round(seconds, 3),
        "questions_per_s": round(len(images) / seconds, 1),
        "answer_tokens_per_s": round(len(images) * ANSWER / seconds, 1),
        "compile_s": round(compile_s, 1),
        "runs": repeats,
    }


def measure_scoring(n: int) -> dict:
    rng = np.random.default_rng(0)
    pick = lambda k: [str(w) for w in rng.choice(WORDS, k)]
    answers = [pick(10) for _ in range(n)]
    preds = pick(n)
    types = [str(t) for t in rng.choice(["yes/no", "number", "other"], n)]
    t0 = time.perf_counter()
    vqa_metrics.score_lists(preds, answers, types)
    vqa_s = time.perf_counter() - t0
    texts = [" ".join(pick(2)) for _ in range(n)]
    t0 = time.perf_counter()
    ocr_metrics.score([t[::-1] for t in texts], texts, ignore_case=True)
    ocr_s = time.perf_counter() - t0
    return {
        "questions": n,
        "vqa_accuracy_questions_per_s": round(n / vqa_s, 1),
        "ocr_metrics_texts_per_s": round(n / ocr_s, 1),
    }


def benchmark(quick: bool) -> dict:
    size = SIZES["quick" if quick else "full"]
    t_start = time.perf_counter()
    model, params, images, question = build(size)
    results = {}
    for use_cache in (True, False):
        print(f"prefix greedy use_cache={use_cache}", file=sys.stderr, flush=True)
        results["greedy_" + ("cached" if use_cache else "uncached")] = measure_decode(
            model, params, images, question, use_cache, size["repeats"] if use_cache else 1
        )
    results["scoring"] = measure_scoring(2_000 if quick else 20_000)
    ratio = (
        results["greedy_cached"]["questions_per_s"] / results["greedy_uncached"]["questions_per_s"]
    )
    return {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "jax_version": jax.__version__,
            "platform": jax.devices()[0].platform,
        },
        "settings": {
            "mode": "quick" if quick else "full",
            "question_tokens": QUESTION,
            "answer_tokens": ANSWER,
            "questions_per_call": size["batch"],
            "decoder": {k: size[k] for k in ("width", "depth", "num_heads", "vocab_size")},
            "image_tokens": 64,
        },
        "results": results,
        "ratios": {"greedy_cached_over_uncached": round(ratio, 2)},
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller decoder")
    args = parser.parse_args(argv)
    print(json.dumps(benchmark(args.quick), indent=2), flush=True)


if __name__ == "__main__":
    main()

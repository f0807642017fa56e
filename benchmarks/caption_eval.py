"""Caption evaluation throughput: images/s of decoding and of COCO scoring, greedy vs beam 4.

    .venv/bin/python benchmarks/caption_eval.py [--quick] [--init WORKDIR] [--data_dir DIR]

Prints one JSON object. The evaluator is the real one (tasks/caption_eval.py, built by the loop's
`train.setup()` from configs/caption_coco.py on the embedded `scenes` validation split, 500 images, the
tiny CapPa architecture, every device of the machine). The weights are `--init`'s (default
workdirs/cappa_tiny when it exists, else random: a random decoder rarely emits EOS, so its captions run to
max_len and decoding is slower than with trained weights; the JSON says which). Decoding is timed after a
warm-up pass (compilation excluded); scoring = PTB tokenisation + BLEU/METEOR/ROUGE-L/CIDEr (+ SPICE if
its jars are present) after a 2-image call that starts METEOR's Java server (once per process; reported as
`scorer_first_call_seconds`). The PTB tokenizer starts a JVM on every call, so it is inside `score_seconds`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tasks import caption_metrics  # noqa: E402
from transfer import config as config_lib  # noqa: E402
from transfer import train, tree  # noqa: E402

caption_coco = config_lib.load_config_module(os.path.join(ROOT, "configs", "caption_coco.py"))

MODES = {
    "full": dict(split="validation", repeats=3),
    "quick": dict(split="validation[:128]", repeats=1),
}


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(sys.stderr)  # stdout is reserved for the JSON


def build(method: str, init: str | None, split: str, data_dir: str | None) -> tuple:
    config, _ = train.prepare_config(caption_coco.get_config(f"method={method}"))
    caption = dict(config.evals.caption.to_dict(), data=dict(split=split), constant_baseline=False)
    overrides = {
        "model_init": init,
        "evals": {"caption": caption},
        "log_flops": False,
        "input.shuffle_buffer_size": 64,
    }
    if data_dir:
        overrides["input.data.data_dir"] = data_dir
    config_lib.apply_overrides(config, overrides)
    run = train.setup(config, tempfile.mkdtemp(prefix="caption_bench_"))
    evaluator = run.evals["caption"][0]
    return evaluator, tree.merge(run.state["params"], run.state["frozen"])


def measure(method: str, init: str | None, mode: dict, data_dir: str | None) -> dict:
    evaluator, params = build(method, init, mode["split"], data_dir)
    evaluator.predict(params)  # warm-up: compiles the decoder for this batch shape
    decode_s = []
    for _ in range(mode["repeats"]):
        start = time.perf_counter()
        preds, _ = evaluator.predict(params)
        decode_s.append(time.perf_counter() - start)
    refs = {i: evaluator.refs[i] for i in preds}
    first = dict(list(preds.items())[:2])
    start = time.perf_counter()  # once per process: METEOR's Java server starts on first use
    caption_metrics.score(
        {i: refs[i] for i in first}, first, metrics=list(evaluator.cfg["metrics"])
    )
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    result = caption_metrics.score(refs, preds, metrics=list(evaluator.cfg["metrics"]))
    score_s = time.perf_counter() - start
    n = len(preds)
    best = min(decode_s)
    words = sum(len(p.split()) for p in preds.values()) / max(n, 1)
    return dict(
        images=n,
        decode_seconds=round(best, 3),
        decode_images_per_s=round(n / best, 1),
        scorer_first_call_seconds=round(startup_s, 3),
        score_seconds=round(score_s, 3),
        score_images_per_s=round(n / score_s, 1),
        total_images_per_s=round(n / (best + score_s), 1),
        mean_words=round(words, 2),
        scores={k: round(v, 4) for k, v in result["scores"].items()},
        skipped=result["skipped"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--init", default=None, help="CapPa workdir (default workdirs/cappa_tiny)")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    default = os.path.join(ROOT, "workdirs", "cappa_tiny")
    init = args.init or (default if os.path.isdir(default) else None)
    mode = MODES["quick" if args.quick else "full"]
    out = {
        "benchmark": "caption_eval",
        "date": datetime.date.today().isoformat(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "weights": init or "random",
        "split": mode["split"],
    }
    with _quiet():
        for method in ("greedy", "beam"):
            out[method] = measure(method, init, mode, args.data_dir)
    out["beam_over_greedy_decode_time"] = round(
        out["beam"]["decode_seconds"] / out["greedy"]["decode_seconds"], 2
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

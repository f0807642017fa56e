"""`cappa demo` / `make demo`: the main job end to end on the embedded data, on a CPU, in about 15 minutes.

Prepares the embedded datasets, trains a tokenizer, pretrains the tiny CapPa (configs/cappa_tiny.py), then
runs every transfer from that tower through the one train loop: few-shot linear probes (pretrained vs a
randomly initialised tower of the same shape), a MAP probe (both towers), SigLiT zero-shot and retrieval, a
caption fine-tune (COCO metrics), VQA and OCR; register attention maps; then WORKDIR/report.md, report.html
and summary.json (tasks/demo/report.py). Every number comes from this run.

Each stage writes WORKDIR/<stage>/ and, when it is done, WORKDIR/<stage>/result.json: re-running reuses
finished stages (and training runs resume from their checkpoints), so an interrupted demo continues where
it stopped. `--smoke` runs every stage with the smallest settings (tiny datasets, a few steps): what the test
suite runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Scale:
    """What differs between the full demo and the smoke run the tests use."""

    suffix: str  # TFDS config of the embedded datasets: "" (default sizes) or "/tiny"
    pretrain_steps: int | None  # None = the config's own
    transfer_steps: dict[str, int | None]
    vocab_size: int
    eval_split: str  # validation examples for the slower evaluators
    fewshot_shots: tuple[int, ...]
    fewshot_datasets: tuple[str, ...]
    fewshot_train_split: str | None  # of the scenes datasets; None = the table's (all 5,000)
    model: dict[
        str, Any
    ]  # overrides of every CapPa-shaped model (dotted keys); {} = configs/cappa_tiny.py's
    run: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of every training run


# Step counts keep the whole demo under 15 minutes on 2 idle cores (stage times: the report, docs/demo.md).
FULL = Scale(
    "",
    None,
    dict(supervised=500, probe=200, siglit=250, caption=200, vqa=200, ocr=200),
    256,
    "validation[:200]",
    (1, 5, 10, 25),
    ("scenes", "scenes_shape", "scenes_color", "scenes_count", "digits"),
    "train[:3000]",
    {},
)
# Smoke few-shot on digits: scenes/tiny has fewer than one image per class. One layer per tower: compiling
# the unscanned layers is most of a smoke stage's time.
SMOKE = Scale(
    "/tiny",
    4,
    dict(supervised=4, probe=4, siglit=4, caption=4, vqa=4, ocr=4),
    96,
    "validation",
    (1, 2),
    ("digits",),
    None,
    {"model.img.depth": 1, "model.txt.depth": 1},
    {"log_flops": False},  # the report shows no MFU; measuring it costs 0.7 s per run
)


# The towers every transfer compares: the CapPa-pretrained one and its random-init twin (same shape and seed,
# never trained); the probes also read the same tower trained on the scenes label (an upper reference: it was
# taught the very classes the probes ask for).
PROBE_TOWERS = ("pretrain", "random_tower", "supervised")  # few-shot, MAP probe
# SigLiT, caption, VQA, OCR: the CapPa run's own transfers (its decoder too), not the supervised tower's.
TOWERS = ("pretrain", "random_tower")


@dataclasses.dataclass
class Context:
    workdir: str
    data_dir: str | None
    scale: Scale

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    @property
    def tokenizer(self) -> str:
        return self.path("tokenizer", f"scenes_bpe{self.scale.vocab_size}.model")

    def data(self, name: str) -> str:
        return name + self.scale.suffix


# ---------------------------------------------------------------------------------------------- helpers
def _say(message: str) -> None:
    print(message, flush=True)


def train_config(ctx: Context, spec: str, overrides: dict[str, Any]) -> Any:
    """A config file (`configs/x.py[:arg]`) merged with defaults, then `overrides` (dotted keys)."""
    from transfer import config as config_lib
    from transfer import train

    config, _ = train.prepare_config(config_lib.load_config_file(os.path.join(ROOT, spec)))
    base = {"input.data.data_dir": ctx.data_dir} if ctx.data_dir else {}
    config_lib.apply_overrides(config, {**base, **ctx.scale.run, **overrides})
    return config


def run_training(ctx: Context, stage: str, spec: str, overrides: dict[str, Any]) -> dict:
    """Trains (or resumes, or finds complete) WORKDIR/<stage>/run; returns the final metrics row."""
    from transfer import metrics, train

    config = train_config(ctx, spec, overrides)
    workdir = ctx.path(stage, "run")
    train.train(config, workdir)
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    final: dict[str, Any] = {}
    for row in rows:  # the last value of every metric (evaluators log less often than training)
        if row["step"] > 0:
            final.update(row)
    start = next((r for r in rows if r["step"] == 0), {})
    return {"workdir": workdir, "final": final, "start": start}


def _steps(ctx: Context, stage: str) -> dict[str, Any]:
    steps = ctx.scale.transfer_steps.get(stage)
    return {} if steps is None else {"total_steps": steps}


# ---------------------------------------------------------------------------------------------- stages
def stage_data(ctx: Context) -> dict:
    from transfer import input_pipeline

    names = ["scenes", "scenes_vqa", "scenes_ocr"] + (
        ["digits"] if "digits" in ctx.scale.fewshot_datasets else []
    )
    for name in names:
        input_pipeline.get_builder(
            {
                "name": ctx.data(name) if name != "digits" else name,
                "split": "train",
                "data_dir": ctx.data_dir,
            }
        )
    return {"datasets": names}


def stage_tokenizer(ctx: Context) -> dict:
    from transfer import tokenizer

    texts = tokenizer.captions_from_dataset(
        {"name": ctx.data("scenes"), "split": "train", "data_dir": ctx.data_dir}
    )
    tokenizer.train_tokenizer(
        texts, ctx.tokenizer, vocab_size=ctx.scale.vocab_size, model_type="bpe"
    )
    return {"path": ctx.tokenizer, "vocab_size": ctx.scale.vocab_size}


def _pretrain_overrides(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input.data.name": ctx.data("scenes"),
        "model.txt.vocab_size": ctx.scale.vocab_size,
        **ctx.scale.model,
    }
    if ctx.scale.pretrain_steps:
        out.update(total_steps=ctx.scale.pretrain_steps, ckpt_steps=ctx.scale.pretrain_steps)
    return out


def stage_pretrain(ctx: Context) -> dict:
    overrides = _pretrain_overrides(ctx)
    for name in ("zeroshot", "val", "colour_swap"):
        overrides[f"evals.{name}.data.split"] = ctx.scale.eval_split
    for name in (
        "val",
        "zeroshot",
        "colour_swap",
    ):  # evaluators at the end only: the demo's time goes to training
        overrides[f"evals.{name}.log_steps"] = None
    return run_training(
        ctx, "pretrain", f"configs/cappa_tiny.py:tokenizer={ctx.tokenizer}", overrides
    )


def stage_random_tower(ctx: Context) -> dict:
    """The baseline tower: same architecture and init (seed) as the pretrained one, never trained
    (total_steps=0 saves the initial state as checkpoint 0)."""
    overrides = _pretrain_overrides(ctx)
    overrides.update(total_steps=0, ckpt_steps=1, evals={})
    return run_training(
        ctx, "random_tower", f"configs/cappa_tiny.py:tokenizer={ctx.tokenizer}", overrides
    )


def stage_supervised(ctx: Context) -> dict:
    """The upper reference: the pretrained tower's architecture (GAP head) trained on the scenes `label` (42
    classes) by configs/classify.py with CapPa's batch size and seed, for 500 steps: its validation accuracy is
    near its plateau by then (26-29 % against 31 % after 3,000: docs/demo_sweep.md), and the demo's minutes go
    to the transfers."""
    cappa = train_config(
        ctx, f"configs/cappa_tiny.py:tokenizer={ctx.tokenizer}", _pretrain_overrides(ctx)
    )
    model = dict(cappa.model.img.to_dict(), pool_type="gap")
    steps = ctx.scale.transfer_steps["supervised"]
    overrides = {
        "input.data.name": ctx.data("scenes"),
        "model": model,
        "seed": cappa.seed,
        "total_steps": steps,
        "ckpt_steps": steps,
        "input.batch_size": cappa.input.batch_size,
        "evals.val.log_steps": None,
    }
    return run_training(ctx, "supervised", "configs/classify.py", overrides)


def stage_fewshot(ctx: Context) -> dict:
    from tasks import fewshot_report

    names = ",".join(ctx.scale.fewshot_datasets)
    spec = os.path.join(ROOT, "configs", f"fewshot.py:{names}")
    if ctx.data_dir:
        spec += f",data_dir={ctx.data_dir}"
    overrides = {"shots": ctx.scale.fewshot_shots, "cache_dir": ctx.path("feature_cache")}
    if (
        ctx.scale.fewshot_train_split
    ):  # the scenes datasets: enough for 25 shots + 10 held out per class
        for name in ctx.scale.fewshot_datasets:
            if name.startswith("scenes"):
                overrides[f"datasets.{name}.train_split"] = ctx.scale.fewshot_train_split
    out = {}
    for tower in PROBE_TOWERS:
        config = fewshot_report.load_config(spec, overrides)
        report = fewshot_report.probe(ctx.path(tower, "run"), config, ctx.path("fewshot", tower))
        fewshot_report.write_report(report, ctx.path("fewshot", tower))
        out[tower] = {  # mean and sample std over seeds, per dataset and shot count
            name: {k: {"mean": v["mean"], "std": v["std"]} for k, v in result["shots"].items()}
            for name, result in report["datasets"].items()
        }
    return out


def stage_map_probe(ctx: Context) -> dict:
    out = {}
    for tower in PROBE_TOWERS:
        overrides = {
            "input.data.name": ctx.data("scenes"),
            "input.data.cache_dir": ctx.path("feature_cache"),
            **_steps(ctx, "probe"),
        }
        spec = f"configs/linear_probe.py:head=map,checkpoint={ctx.path(tower, 'run')}"
        out[tower] = run_training(ctx, f"map_probe/{tower}", spec, overrides)
    return out


def stage_siglit(ctx: Context) -> dict:
    """A text tower trained from scratch against each frozen tower, same recipe and steps: the image tower is
    the only difference (at 250 steps, starting the text tower from CapPa's decoder did worse: docs/demo_sweep.md)."""
    overrides = {
        "input.data.name": ctx.data("scenes"),
        **_steps(ctx, "siglit"),
        "model.txt.vocab_size": ctx.scale.vocab_size,
        **ctx.scale.model,
    }
    out = {}
    for tower in TOWERS:
        spec = f"configs/siglit.py:tower={ctx.path(tower, 'run')},tokenizer={ctx.tokenizer},txt_init=scratch"
        out[tower] = run_training(ctx, f"siglit/{tower}", spec, overrides)
    return out


def stage_caption(ctx: Context) -> dict:
    """The caption fine-tune from each CapPa init (tower frozen, decoder trained), same recipe and steps;
    the pretrained run also scores its zero-shot before and after (the collapse check)."""
    split = ctx.scale.eval_split
    out = {}
    for tower in TOWERS:
        overrides = {
            "input.data.name": ctx.data("scenes"),
            **_steps(ctx, "caption"),
            "model.txt.vocab_size": ctx.scale.vocab_size,
            "tokenizer": ctx.tokenizer,
            "evals.zeroshot.data.split": split,
            "evals.val.data.split": split,
            "evals.caption.data.split": split,
            **ctx.scale.model,
        }
        spec = f"configs/caption_coco.py:init={ctx.path(tower, 'run')},tokenizer={ctx.tokenizer}"
        if tower != "pretrain":  # no collapse check: a random init has no zero-shot ability to lose
            evals = train_config(ctx, spec, overrides).evals.to_dict()
            evals.pop("zeroshot", None)
            overrides.update(evals=evals, eval_at_start=False)
        out[tower] = run_training(ctx, f"caption/{tower}", spec, overrides)
    return out


def _answer_stage(ctx: Context, stage: str, dataset: str) -> dict:
    """VQA / OCR from each CapPa init: the task's own evaluator + perplexity (the caption stage already
    shows the before/after of the zero-shot; here it would double the stage's time)."""
    evals = train_config(ctx, f"configs/{stage}.py", {}).evals.to_dict()
    kept = {name: evals[name] for name in ("val", stage)}
    for cfg in kept.values():
        cfg["data"]["split"] = ctx.scale.eval_split
    overrides = {
        "input.data.name": ctx.data(dataset),
        "model.txt.vocab_size": ctx.scale.vocab_size,
        "evals": kept,
        "eval_at_start": False,
        **_steps(ctx, stage),
        **ctx.scale.model,
    }
    out = {}
    for tower in TOWERS:
        spec = f"configs/{stage}.py:init={ctx.path(tower, 'run')},tokenizer={ctx.tokenizer}"
        out[tower] = run_training(ctx, f"{stage}/{tower}", spec, overrides)
    return out


def stage_vqa(ctx: Context) -> dict:
    return _answer_stage(ctx, "vqa", "scenes_vqa")


def stage_ocr(ctx: Context) -> dict:
    return _answer_stage(ctx, "ocr", "scenes_ocr")


def stage_attention(ctx: Context) -> dict:
    """Register attention maps of the pretrained tower on two validation images (PNG overlays)."""
    import numpy as np
    from PIL import Image

    from pretrain import attention
    from transfer import input_pipeline

    cfg = {
        "data": {"name": ctx.data("scenes"), "split": "validation[:2]", "data_dir": ctx.data_dir},
        "pp": "decode|keep('image')",
    }
    batch = next(
        iter(input_pipeline.eval_batches(cfg, batch_size=2, process_index=0, process_count=1))
    )
    folder = ctx.path("attention")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(batch["image"]):
        paths.append(os.path.join(folder, f"image_{i}.png"))
        Image.fromarray(np.asarray(image, np.uint8)).save(paths[-1])
    code = attention.main(["--checkpoint", ctx.path("pretrain", "run"), *paths, "--out", folder])
    if code:
        raise RuntimeError(f"cappa attention failed (exit {code})")
    return {"pngs": sorted(f for f in os.listdir(folder) if f.endswith("_attention.png"))}


Stage = tuple[str, str, Callable[[Context], dict]]
STAGES: list[Stage] = [
    ("data", "prepare the embedded datasets", stage_data),
    ("tokenizer", "train a BPE SentencePiece tokenizer on the captions", stage_tokenizer),
    ("pretrain", "pretrain the tiny CapPa captioner (configs/cappa_tiny.py)", stage_pretrain),
    (
        "random_tower",
        "the random-init baseline tower (same shape, never trained)",
        stage_random_tower,
    ),
    (
        "supervised",
        "the supervised reference tower (same shape, trained on the label)",
        stage_supervised,
    ),
    ("fewshot", "few-shot linear probes of the three towers", stage_fewshot),
    ("map_probe", "MAP-head probes with a weight-decay sweep, three towers", stage_map_probe),
    (
        "siglit",
        "SigLiT: a text tower against each frozen tower; zero-shot + retrieval",
        stage_siglit,
    ),
    ("caption", "caption fine-tunes from the CapPa and random inits, COCO metrics", stage_caption),
    ("vqa", "VQA from both inits: the question as a decoder prefix, VQA accuracy", stage_vqa),
    ("ocr", "OCR from both inits: read the words; exact match, CER, ANLS", stage_ocr),
    ("attention", "register attention maps", stage_attention),
]


# ---------------------------------------------------------------------------------------------- driver
def run_stages(ctx: Context, only: list[str] | None = None) -> dict[str, dict]:
    """Runs (or reuses) every stage in order; returns {stage: result}."""
    results: dict[str, dict] = {}
    start = time.monotonic()
    for index, (name, title, fn) in enumerate(STAGES, 1):
        if only and name not in only:
            continue
        done = ctx.path(name, "result.json")
        header = f"[demo {index}/{len(STAGES)}] {name}: {title}"
        if os.path.isfile(done):
            with open(done) as f:
                results[name] = json.load(f)
            _say(f"{header} (done before, reused)")
            continue
        _say(f"{header} ...")
        t0 = time.monotonic()
        result = fn(ctx)
        result["seconds"] = round(time.monotonic() - t0, 1)
        os.makedirs(os.path.dirname(done), exist_ok=True)
        with open(done + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(done + ".tmp", done)
        results[name] = result
        elapsed = time.monotonic() - start
        _say(
            f"[demo {index}/{len(STAGES)}] {name} done in {result['seconds']:.0f}s (total {elapsed / 60:.1f} min)"
        )
    return results


def _compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in the workdir (unless one is set already): the random-init and
    supervised towers' transfers run the same programs as the pretrained tower's, so they compile once."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cappa demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's own)")
    parser.add_argument(
        "--smoke", action="store_true", help="smallest settings: the test suite's run"
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only these stages")
    args = parser.parse_args(argv)
    ctx = Context(os.path.abspath(args.workdir), args.data_dir, SMOKE if args.smoke else FULL)
    os.makedirs(ctx.workdir, exist_ok=True)
    _compilation_cache(ctx.path("jax_cache"))
    start = time.monotonic()
    results = run_stages(ctx, args.only)
    from tasks.demo import report

    paths = report.write(ctx.workdir, results, minutes=(time.monotonic() - start) / 60)
    _say(f"\nReport: {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

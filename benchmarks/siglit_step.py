"""SigLiT train step with the image tower frozen vs trained; prints one JSON object.

    .venv/bin/python benchmarks/siglit_step.py [--quick] [--data_dir DIR] [--tokenizer PATH]

What and why:

* The task is tasks/siglit.py with configs/siglit.py's recipe (adamw, clip 1.0, ring sigmoid loss)
  on the embedded `scenes` captions. "frozen" is that config's own schedule,
  `[("img/.*", None), (".*", {...})]`: no gradient and no optimizer state for `img/...`.
  "unfrozen" is a single schedule for every parameter, so the tower is trained too.
* Towers, randomly initialised (`model_init=None`: nothing is read from a previous run, so this runs
  in a fresh clone): configs/siglit.py's TOWER (the tiny CapPa tower, 64 px) and, in full mode, a
  big_vision-style ViT-S/16 at 224 px (the scenes images resized). The step time does not depend on
  the weights' values.
* The step is the one `transfer.train.setup()` builds (same jit, shardings, donation, optimizer),
  lowered and compiled once and called directly on the first real batch, already on the device.
* The 2-core machine drifts between fast and slow states, so frozen and unfrozen steps of a tower
  run in interleaved rounds (order alternating) and the headline is the per-round ratio
  unfrozen/frozen, measured back to back in one process; absolute times are only indicative.
* Sizes are read from the engine's state: trainable / frozen parameter counts and the optimizer
  state's bytes, with the bytes under `img/...` counted separately (zero when frozen: checked).
* The captions are tokenized with workdirs/tokenizers/scenes_bpe256.model when present, otherwise
  with a 256-piece BPE model trained on the scenes captions in a temporary directory.
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
from statistics import median
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402

from transfer import config as config_lib  # noqa: E402
from transfer import flops, input_pipeline, sharding, tokenizer, train  # noqa: E402

siglit_config = config_lib.load_config_module(os.path.join(ROOT, "configs", "siglit.py"))

# big_vision's plain blocks (LayerNorm, GELU, biases) for the ViT-S/16 tower and its text tower.
BIG_VISION = dict(norm="layernorm", normformer=False, mlp_type="gelu", use_bias=True)
TOWERS = {
    # configs/siglit.py's tower and text tower (the tiny CapPa shapes), 64 px scenes images.
    "cappa_tiny": dict(
        image=64,
        batch=64,
        img=dict(siglit_config.TOWER),
        txt=dict(siglit_config.TEXT),
    ),
    # ViT-S/16 at 224 px (196 patches), no registers; the text tower at its width, 2 layers.
    "vit_s16": dict(
        image=224,
        batch=32,
        img=dict(
            width=384,
            depth=12,
            mlp_dim=1536,
            num_heads=6,
            patch_size=16,
            num_registers=0,
            pool_type="none",
            **BIG_VISION,
        ),
        txt=dict(siglit_config.TEXT, mlp_dim=1536, **BIG_VISION),
    ),
}
# One rule for every parameter (a list: the task's default schedule is per-parameter rules).
UNFROZEN_SCHEDULE = [(".*", dict(decay_type="cosine", warmup_steps=50))]
TOKENIZER = os.path.join(ROOT, siglit_config.TOKENIZER)
TOKENIZER_VOCAB = 256
MODES = {  # towers measured; per tower: interleaved rounds and steps per round
    "quick": dict(towers=["cappa_tiny"], rounds={"cappa_tiny": 3}, steps={"cappa_tiny": 3}),
    "full": dict(
        towers=list(TOWERS),
        rounds={"cappa_tiny": 7, "vit_s16": 5},
        steps={"cappa_tiny": 5, "vit_s16": 1},
    ),
}


def _log(message: str) -> None:
    print(f"[siglit-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(sys.stderr)  # stdout is reserved for the JSON


def get_tokenizer(path: str | None, data_dir: str, tmp_dir: str) -> tuple[str, str]:
    """(model path, where it came from): `path` if given, else the repo's scenes model if present,
    else a fresh BPE model trained on the scenes training captions inside `tmp_dir`."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tokenizer {path}: no such file (omit it to train one).")
        return path, "given"
    if os.path.isfile(TOKENIZER):
        return TOKENIZER, "reused"
    out = os.path.join(tmp_dir, f"scenes_bpe{TOKENIZER_VOCAB}.model")
    texts = tokenizer.captions_from_dataset(
        {"name": "scenes", "split": "train", "data_dir": data_dir}
    )
    tokenizer.train_tokenizer(texts, out, vocab_size=TOKENIZER_VOCAB, model_type="bpe")
    return out, "trained"


def bench_config(
    name: str, *, frozen: bool, data_dir: str, tokenizer_path: str
) -> ml_collections.ConfigDict:
    """configs/siglit.py at benchmark size, overridden the way `cappa train --config.x=...` does.

    No evaluators, no checkpoints, no model_init: only the step is measured.
    """
    spec = TOWERS[name]
    config = siglit_config.get_config(f"tokenizer={tokenizer_path}")
    config, _ = train.prepare_config(config)
    resize = f"|resize({spec['image']})" if spec["image"] != 64 else ""  # scenes images: 64 px
    pp = config.input.pp.replace("decode|", f"decode{resize}|", 1)
    overrides: dict[str, Any] = {
        "model.img": dict(spec["img"]),
        "model.txt": dict(spec["txt"]),
        "input.batch_size": spec["batch"],
        "input.data.data_dir": data_dir,
        "input.pp": pp,
        # Only the first batch is used: a 5,000-image buffer of 224 px images would be 3 GB.
        "input.shuffle_buffer_size": spec["batch"],
        "model_init": None,
        "model_load": {"dont_load": []},
        "evals": {},
        "ckpt_steps": 10**9,
        "log_flops": False,
    }
    if not frozen:
        overrides["schedule"] = list(UNFROZEN_SCHEDULE)
    config_lib.apply_overrides(config, overrides)
    return config


def _size(tree: Any) -> tuple[int, int]:
    """(elements, bytes) of the arrays in `tree`."""
    leaves = jax.tree.leaves(tree)
    return sum(int(x.size) for x in leaves), sum(int(x.nbytes) for x in leaves)


def _img_bytes(opt_state: Any) -> int:
    """Bytes of the optimizer state's leaves that belong to `img/...` parameters."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if any(getattr(k, "key", None) == "img" for k in path):
            total += int(leaf.nbytes)
    return total


class EngineStep:
    """The engine's jitted step, its state and the first real batch on the device."""

    def __init__(self, config: ml_collections.ConfigDict):
        workdir = tempfile.mkdtemp(prefix="cappa-siglit-bench-")
        try:
            with _quiet():
                run = train.setup(config, workdir, devices=jax.devices()[:1])
            run.mngr.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        state = run.state
        self.batch_size = len(run.first_batch["image"])
        self.sizes = {
            "trainable_params": _size(state["params"])[0],
            "frozen_params": _size(state["frozen"])[0],
            "trainable_img_params": _size(state["params"].get("img", {}))[0],
            "opt_state_bytes": _size(state["opt"])[1],
            "opt_state_img_bytes": _img_bytes(state["opt"]),
        }
        self.state, self.mesh = state, run.mesh
        self.batch = sharding.put_batch(run.first_batch, run.batch_sharding)
        with jax.set_mesh(self.mesh):
            lowered = run.step_fn.lower(self.state, self.batch)
            # The engine's program, compiled once and called directly (no second compile).
            self.step_fn = lowered.compile()
        self.gflops = (flops.step_flops(lowered) or 0.0) / 1e9
        memory = self.step_fn.memory_analysis()
        self.temp_bytes = int(memory.temp_size_in_bytes) if memory is not None else None
        self.run(1)  # warm-up (first-call allocations)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` back-to-back steps, one sync at the end (as the loop does)."""
        with jax.set_mesh(self.mesh):
            t0 = time.perf_counter()
            for _ in range(steps):
                self.state, out = self.step_fn(self.state, self.batch)
            jax.block_until_ready((self.state, out))
        return (time.perf_counter() - t0) / steps


def bench_tower(name: str, mode: dict, data_dir: str, tokenizer_path: str) -> dict[str, Any]:
    """Frozen and unfrozen steps of one tower in interleaved rounds; their figures and ratios."""
    _log(f"{name}: building and compiling the frozen and unfrozen steps")
    steps = {
        variant: EngineStep(
            bench_config(
                name, frozen=variant == "frozen", data_dir=data_dir, tokenizer_path=tokenizer_path
            )
        )
        for variant in ("frozen", "unfrozen")
    }
    if (
        steps["frozen"].sizes["opt_state_img_bytes"]
        or steps["frozen"].sizes["trainable_img_params"]
    ):
        raise AssertionError(f"{name}: the frozen run keeps trainable img/... or optimizer state")
    times: dict[str, list[float]] = {v: [] for v in steps}
    rounds = mode["rounds"][name]
    for r in range(rounds):
        _log(f"{name}: round {r + 1}/{rounds}")
        for variant in list(steps)[:: 1 if r % 2 else -1]:
            times[variant].append(steps[variant].run(mode["steps"][name]))
    out: dict[str, Any] = {
        "image": TOWERS[name]["image"],
        "batch": steps["frozen"].batch_size,
        "img": TOWERS[name]["img"],
        "txt": TOWERS[name]["txt"],
    }
    for variant, step in steps.items():
        t = median(times[variant])
        out[variant] = {
            "step_s": round(t, 4),
            "step_s_range": [round(min(times[variant]), 4), round(max(times[variant]), 4)],
            "examples_per_s": round(step.batch_size / t, 1),
            **step.sizes,
            "gflops_per_step": round(step.gflops, 2),
            "compiled_temp_bytes": step.temp_bytes,
        }
    per_round = [u / f for u, f in zip(times["unfrozen"], times["frozen"], strict=True)]
    out["unfrozen_over_frozen_time"] = round(median(per_round), 3)
    out["unfrozen_over_frozen_time_range"] = [round(min(per_round), 3), round(max(per_round), 3)]
    if steps["frozen"].gflops:
        out["unfrozen_over_frozen_flops"] = round(
            steps["unfrozen"].gflops / steps["frozen"].gflops, 3
        )
    out["opt_state_saved_bytes"] = (
        out["unfrozen"]["opt_state_bytes"] - out["frozen"]["opt_state_bytes"]
    )
    return out


def benchmark(quick: bool, data_dir: str, tokenizer_path: str | None) -> dict[str, Any]:
    mode = MODES["quick" if quick else "full"]
    t_start, load_start = time.perf_counter(), os.getloadavg()
    input_pipeline.get_builder({"name": "scenes", "split": "train", "data_dir": data_dir})
    tmp_dir = tempfile.mkdtemp(prefix="cappa-siglit-tok-")
    try:
        tok_path, tok_source = get_tokenizer(tokenizer_path, data_dir, tmp_dir)
        _log(f"tokenizer ({tok_source}): {os.path.basename(tok_path)}")
        towers = {name: bench_tower(name, mode, data_dir, tok_path) for name in mode["towers"]}
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {
        "machine": {
            "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__,
            "platform": jax.devices()[0].platform,
            "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        },
        "settings": {
            "mode": "quick" if quick else "full",
            "rounds": mode["rounds"],
            "steps_per_round": mode["steps"],
            "tokenizer": tok_source,
            "frozen_schedule": "configs/siglit.py: [('img/.*', None), ('.*', cosine)]",
            "unfrozen_schedule": UNFROZEN_SCHEDULE,
            "optimizer": "adamw, clip 1.0 (configs/siglit.py)",
        },
        "towers": towers,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny tower only, 3 short rounds")
    parser.add_argument(
        "--data_dir",
        default=os.path.join(tempfile.gettempdir(), "cappa-bench-tfds"),
        help="TFDS data_dir; `scenes` is generated there on first use",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model of the captions (default: the repo's scenes model, else trained)",
    )
    args = parser.parse_args(argv)
    print(json.dumps(benchmark(args.quick, args.data_dir, args.tokenizer), indent=2), flush=True)


if __name__ == "__main__":
    main()

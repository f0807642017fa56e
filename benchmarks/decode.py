"""Caption decoding speed: greedy and beam-4, with vs without the KV cache, 64 tokens per caption.

    .venv/bin/python benchmarks/decode.py [--quick]

Prints one JSON object. The model is random (decoding speed does not depend on the weights) with a
ViT-B-width text decoder; EOS is made impossible so every caption runs the full 64 steps and
early stopping never shortens a measurement. "Without cache" is `generate(use_cache=False)`: the
whole teacher-forced decoder recomputed at every step, as a decoder without a cache must. Compilation
is excluded (each variant is compiled ahead of time, then timed). `tokens_per_s` counts caption
tokens (images x 64 / seconds); beam search decodes `beam_size` rows per image for them.
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

from pretrain import cappa, decode  # noqa: E402

TOKENS = 64
TARGET = 5.0  # cached / uncached tokens/s
SIZES = {
    # width 768 / 12 heads as ViT-B; fewer layers and a smaller vocabulary than CapPa-B so that the
    # uncached reference (64 full-length decoder passes per caption) finishes in ~1-2 min on 2 cores.
    # Images per call: greedy decodes 4 rows, beam search 2 x 4 beams = 8 rows.
    "full": dict(width=768, depth=3, num_heads=12, vocab_size=8_000, images=4, repeats=3),
    "quick": dict(width=384, depth=2, num_heads=6, vocab_size=4_000, images=4, repeats=2),
}
BEAM_IMAGES = 2
EOS = 1


def build(size: dict) -> tuple[cappa.Model, dict, np.ndarray]:
    """A random model (shapes from eval_shape, values from numpy: nothing to compile) and images."""
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
            max_len=TOKENS,
        ),
    )
    model = cappa.Model(**cappa.model_kwargs(cfg))
    images = np.random.default_rng(0).uniform(-1, 1, (size["images"], 64, 64, 3)).astype(np.float32)
    return model, jax.device_put(random_params(model, images[:1])), images


def random_params(model: cappa.Model, image: np.ndarray, seed: int = 1) -> dict:
    """Numpy parameters of `model` (shapes from eval_shape: nothing is compiled), with the EOS logit made
    impossible so that every caption runs all TOKENS steps. `image`: one image of the model's size."""
    tokens = jnp.zeros((1, TOKENS), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), image, tokens)["params"]
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        std = 1.0 if name == "embedding" else 0.02 if name == "bias" else x.shape[-1] ** -0.5
        return rng.normal(0.0, std, x.shape).astype(x.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    params["txt"]["head"]["bias"][EOS] = -1e9  # Never ends: all 64 steps run.
    return params


def measure(model, params, images, method: str, use_cache: bool, repeats: int) -> dict:
    """Seconds per `generate` call (median of `repeats`), compile time apart."""
    settings = decode.Settings(
        method=method,
        max_len=TOKENS,
        eos_id=EOS,
        pad_id=0,
        top_k=0,
        nucleus=False,
        beam_size=4,
        num_return_sequences=1,
        return_embeddings=False,
        use_cache=use_cache,
        vocab_limit=None,
    )
    knobs = {
        k: jnp.float32(v) for k, v in dict(temperature=1.0, top_p=1.0, length_penalty=0.0).items()
    }
    args = (params, jnp.asarray(images), jax.random.key(0), knobs)
    t0 = time.perf_counter()
    fn = decode.compiled(model, settings).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    assert int(np.min(out["lengths"])) == TOKENS, "a caption ended early: the measurement is short"
    seconds = median(times)
    return {
        "seconds": round(seconds, 3),
        "tokens_per_s": round(images.shape[0] * TOKENS / seconds, 1),
        "compile_s": round(compile_s, 1),
        "runs": repeats,
    }


def benchmark(quick: bool) -> dict:
    size = SIZES["quick" if quick else "full"]
    t_start = time.perf_counter()
    model, params, images = build(size)
    n_params = sum(x.size for x in jax.tree.leaves(params["txt"]))
    results, ratios = {}, {}
    for method in ("greedy", "beam"):
        name = "beam4" if method == "beam" else method
        batch = images[:BEAM_IMAGES] if method == "beam" else images
        for use_cache in (True, False):
            print(f"{name} use_cache={use_cache}", file=sys.stderr, flush=True)
            repeats = size["repeats"] if use_cache else 1  # The reference is slow and steady.
            results[f"{name}_{'cached' if use_cache else 'uncached'}"] = measure(
                model, params, batch, method, use_cache, repeats
            )
        fast, slow = results[f"{name}_cached"], results[f"{name}_uncached"]
        ratios[f"{name}_cached_over_uncached"] = round(
            fast["tokens_per_s"] / slow["tokens_per_s"], 2
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
            "tokens": TOKENS,
            "decoder": {k: size[k] for k in ("width", "depth", "num_heads", "vocab_size")},
            "decoder_params_m": round(n_params / 1e6, 1),
            "images": {"greedy": size["images"], "beam4": BEAM_IMAGES},
            "image_tokens": 64,
            "beam_size": 4,
        },
        "results": results,
        "ratios": ratios,
        "target": {
            k: {"value": v, "target": f">= {TARGET}", "pass": v >= TARGET}
            for k, v in ratios.items()
        },
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller decoder (~20 s)")
    args = parser.parse_args(argv)
    print(json.dumps(benchmark(args.quick), indent=2), flush=True)


if __name__ == "__main__":
    main()

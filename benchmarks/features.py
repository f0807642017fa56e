"""Feature-extraction benchmark: images/s of `pretrain.features.compute` (input pipeline + sharded jitted tower)
against the bare jitted forward pass on batches already on device; prints one JSON object.

    .venv/bin/python benchmarks/features.py [--quick] [--data_dir DIR]

The ratio extraction/bare is the headline (this machine drifts between fast and slow states, so absolute
images/s are indicative only): it says how much the TFDS decode + pp + host->device transfer + gather costs
on top of the model. Both run on every local device (data parallel), as a probe does.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pretrain import features, vit  # noqa: E402
from transfer import input_pipeline  # noqa: E402

TOWERS = {
    # The tiny CapPa tower (configs/cappa_tiny.py) and a ViT-S/16 at 224 px.
    "tiny_64px": (
        dict(width=128, depth=4, mlp_dim=512, num_heads=4, patch_size=16, num_registers=4),
        64,
    ),
    "s16_224px": (dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16), 224),
}


def bench(name: str, data: dict, batch_size: int, limit: int) -> dict:
    kw, size = TOWERS[name]
    kw = dict(kw, pool_type="none")
    params = vit.ViT(**kw).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    fn = features.features_fn(kw, "final", "gap")
    pp = f"decode|resize({size})|value_range(-1, 1)|keep('image', 'label')"
    split = f"{data['split']}[:{limit}]"
    data = dict(data, split=split)
    n = input_pipeline.num_examples(data)

    features.compute(
        fn, params, data, pp=pp, batch_size=batch_size
    )  # Compile + warm the input cache.
    t0 = time.perf_counter()
    feats, _ = features.compute(fn, params, data, pp=pp, batch_size=batch_size)
    extraction = time.perf_counter() - t0
    assert len(feats) == n

    step, placed, batch_sh = features._data_parallel(fn, params)
    images = jax.device_put(jnp.zeros((batch_size, size, size, 3)), batch_sh)
    step(placed, images).block_until_ready()
    batches = -(-n // batch_size)
    t0 = time.perf_counter()
    for _ in range(batches):
        out = step(placed, images)
    out.block_until_ready()
    bare = time.perf_counter() - t0
    return {
        "tower": name,
        "images": n,
        "batch_size": batch_size,
        "extraction_images_per_s": round(n / extraction, 1),
        "bare_forward_images_per_s": round(batches * batch_size / bare, 1),
        "extraction_over_bare_time": round(extraction / (bare * n / (batches * batch_size)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, tiny tower only")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: a temporary one)")
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_tfds_")
    data = {"name": "scenes", "split": "train", "data_dir": data_dir}
    runs = [("tiny_64px", 1024 if not args.quick else 256)]
    if not args.quick:
        runs.append(("s16_224px", 256))
    # Dataset generation and TFDS print progress to stdout; stdout is for the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        results = [bench(name, data, 64, limit) for name, limit in runs]
    print(
        json.dumps(
            {
                "benchmark": "feature_extraction",
                "date": datetime.date.today().isoformat(),
                "devices": jax.device_count(),
                "platform": jax.devices()[0].platform,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

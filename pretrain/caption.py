"""`cappa caption`: caption image files with a trained CapPa run.

    cappa caption --checkpoint WORKDIR cat.jpg dog.png --method beam --beam_size 4

Prints one line per caption, `path<TAB>caption<TAB>logprob` (R lines per image with
`--num_return_sequences R`, best first), or with `--json` one JSON object per image:
`{"image": path, "captions": [{"text", "logprob", "length", "tokens"}, ...]}`.
Images are resized to the resolution the tower was trained at (override with `--image_size`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cappa caption", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="workdir of a `cappa train` CapPa run")
    p.add_argument("images", nargs="+", help="image files (anything PIL reads)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--tokenizer", default=None, help="SentencePiece .model (default: config.tokenizer)"
    )
    p.add_argument("--method", default="greedy", choices=("greedy", "sample", "beam"))
    p.add_argument("--max_len", type=int, default=None, help="default: the decoder's max_len")
    p.add_argument("--beam_size", type=int, default=4)
    p.add_argument("--length_penalty", type=float, default=0.0, help="GNMT alpha (beam search)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_size", type=int, default=16, help="images per decoder call")
    p.add_argument("--image_size", type=int, default=None, help="default: the tower's resolution")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    return p


def caption_files(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Loads the run, reads the images and decodes them in batches; one dict per image."""
    import jax
    import numpy as np

    from pretrain import decode, runs
    from transfer import config as config_lib

    run = runs.load_run(args.checkpoint, args.step, args.tokenizer)
    if run.tokenizer is None:
        raise config_lib.InputError(
            f"the run in {args.checkpoint!r} has no config.tokenizer: pass --tokenizer PATH.model"
        )
    runs.require_captioner(run)
    size = args.image_size or runs.image_size(run.params, run.config)
    images = runs.load_images(
        args.images, size
    )  # All read first: a bad file fails before decoding.
    kwargs = dict(
        method=args.method,
        max_len=args.max_len or int(run.task.model.txt_kw["max_len"]),
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_return_sequences=args.num_return_sequences,
        rng=jax.random.key(args.seed),
    )
    results = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        if args.method == "sample":
            kwargs["rng"] = jax.random.fold_in(jax.random.key(args.seed), start)
        out = decode.captions(run.task.model, run.params, batch, run.tokenizer, **kwargs)
        for i, texts in enumerate(out["text"]):
            caps = [
                {
                    "text": text,
                    "logprob": float(out["logprobs"][i, r]),
                    "length": int(out["lengths"][i, r]),
                    "tokens": np.asarray(out["tokens"][i, r, : out["lengths"][i, r]]).tolist(),
                }
                for r, text in enumerate(texts)
            ]
            results.append({"image": args.images[start + i], "captions": caps})
    return results


def main(argv: list[str]) -> int:
    """Entry point of `cappa caption`; returns the exit code (2 = bad input, message on stderr)."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch_size must be >= 1", file=sys.stderr)
        return 2
    from transfer import config as config_lib

    try:
        results = caption_files(args)
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    for result in results:
        if args.json:
            print(json.dumps(result))
            continue
        for cap in result["captions"]:
            print(f"{result['image']}\t{cap['text']}\t{cap['logprob']:.4f}")
    return 0

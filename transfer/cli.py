"""The `cappa` command: `cappa train --config configs/classify.py --workdir DIR --config.total_steps=100`.

Subcommands are found by import string, so later parts of the project (CapPa tools, task reports) add commands
without the engine importing them.
"""

from __future__ import annotations

import argparse
import os
import sys

from transfer import config as config_lib
from transfer import registry

# name -> ("module:function", help). The function takes the remaining argv.
COMMANDS = {
    "train": ("transfer.cli:train_command", "train (or resume) a run in a workdir"),
    "demo": (
        "tasks.demo.pipeline:main",
        "run the main job on the embedded data (what `make demo` does)",
    ),
    "tokenizer": (
        "transfer.tokenizer:main",
        "SentencePiece models: train on a dataset's captions, encode, decode",
    ),
    "info": ("pretrain.info:main", "parameter counts and FLOPs of a config (nothing allocated)"),
    "caption": ("pretrain.caption:main", "caption images with a trained CapPa run"),
    "attention": ("pretrain.attention:main", "write attention-map overlays (PNG) for an image"),
    "probe": (
        "tasks.fewshot_report:main",
        "few-shot linear probes of a trained tower, with a report",
    ),
    "zeroshot": ("tasks.zeroshot:main", "top classes of images with a trained SigLiT run"),
    "vqa": ("tasks.vqa:main", "answer questions about an image with a trained VQA run"),
    "score-vqa": (
        "tasks.vqa_metrics:main",
        "score VQAv2-format answers with the official VQA accuracy (overall, per answer type)",
    ),
    "score-captions": (
        "tasks.caption_metrics:main",
        "score COCO-format caption predictions (BLEU, METEOR, ROUGE-L, CIDEr, SPICE if available)",
    ),
}


def train_command(argv: list[str]) -> int:
    argv, overrides = config_lib.split_cli_overrides(argv)
    parser = argparse.ArgumentParser(prog="cappa train", description=__doc__)
    parser.add_argument(
        "--config",
        required=True,
        help="path/to/config.py[:arg]; override fields with --config.a.b=value",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        help="run directory: config.json, metrics.jsonl, tb/, checkpoints/",
    )
    parser.add_argument(
        "--coordinator_address",
        default=None,
        help="host:port of process 0, to join a multi-process run by hand "
        "(TPU pods and SLURM are detected without it)",
    )
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    args = parser.parse_args(argv)
    # Heavy imports after argument errors are reported.
    from transfer import metrics, sharding, train

    sharding.maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )
    try:
        config = config_lib.load_config_file(args.config)
        config, _ = train.prepare_config(config)
        config_lib.apply_overrides(config, overrides)
        result = train.train(config, args.workdir)
    except train.Preempted as e:
        print(e, file=sys.stderr)
        return 143
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics.log(
        str({k: round(v, 5) if isinstance(v, float) else v for k, v in result.metrics.items()})
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter only (tf.data).
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: cappa COMMAND [args]", "", "commands:"]
        lines += [f"  {name:15s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    target, _ = COMMANDS[argv[0]]
    return int(registry.import_object(target)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())

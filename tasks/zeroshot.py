"""`cappa zeroshot`: the top classes of image files by a trained SigLiT (or Llip) run; the class-name and
prompt-template files and the template-ensembled class embeddings it shares with the `zeroshot_embed`
evaluator (tasks/retrieval_eval.py).

    cappa zeroshot --checkpoint WORKDIR --classes configs/zeroshot/scenes_classes.txt \\
        --templates configs/zeroshot/scenes_templates.txt red.png star.jpg --top 5

Prints `path<TAB>class<TAB>probability` lines, best first, `--top` per image (or with `--json` one
object per image). The probability of a class is sigmoid(exp(t) * similarity + b) with the run's
learnt log-temperature `t` and bias `b`, as the sigmoid loss trains it: each class is judged on
its own, so the numbers of an image need not sum to one.

Files of class names and of templates share one format: UTF-8 text, one entry per line, surrounding
whitespace stripped, blank lines and lines starting with `#` skipped. A template holds `{}` once,
where the class name goes ("a photo of a {}."); a file of many templates is an ensemble (each
class embedding is the mean of its prompts' embeddings, re-normalised). A relative path that does
not exist from the working directory is also looked up from the repository root, so
`configs/zeroshot/...` works from anywhere.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from transfer import config as config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_path(path: str) -> str:
    """`path` as given, else relative to the repository root (for `configs/zeroshot/...`)."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    in_repo = os.path.join(_ROOT, path)
    return in_repo if os.path.exists(in_repo) else path


def read_entries(path: str, what: str) -> list[str]:
    """The non-blank, non-comment lines of a text file, stripped; an empty list is an error."""
    resolved = resolve_path(path)
    if not os.path.isfile(resolved):
        raise config_lib.MissingFileError(f"{what} file {path!r} does not exist.")
    with open(resolved, encoding="utf-8") as f:
        entries = [line.strip() for line in f]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise config_lib.InputError(
            f"{what} file {path!r} has no entries: write one per line (blank lines and lines "
            "starting with '#' are skipped)."
        )
    return entries


def check_class_names(names: Sequence[str], where: str) -> list[str]:
    """Non-empty, distinct strings (a repeated class would make the argmax ambiguous)."""
    if isinstance(names, str) or not names:
        raise config_lib.InputError(
            f"{where}: class names must be a non-empty list of strings, got {names!r}."
        )
    names = [str(n).strip() for n in names]
    if not all(names):
        raise config_lib.InputError(f"{where}: class names must not be empty strings.")
    repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if repeated:
        raise config_lib.InputError(f"{where}: repeated class names {repeated}; make each unique.")
    return names


def check_templates(templates: Sequence[str], where: str) -> list[str]:
    """Each template must hold `{}` exactly once and no other format field."""
    if isinstance(templates, str):
        templates = [templates]
    if not templates:
        raise config_lib.InputError(
            f"{where}: no templates; give at least one, e.g. ['a photo of a {{}}.']."
        )
    for i, template in enumerate(templates):
        bad = template.count("{}") != 1
        if not bad:
            try:
                bad = template.format("x") != template.replace("{}", "x")
            except (IndexError, KeyError, ValueError):
                bad = True
        if bad:
            raise config_lib.InputError(
                f"{where}: template {i + 1} {template!r} must contain '{{}}' exactly once (where the "
                "class name goes) and no other braces, e.g. 'a photo of a {}.'."
            )
    return list(templates)


def read_class_names(path: str) -> list[str]:
    return check_class_names(read_entries(path, "class names"), f"class names file {path!r}")


def read_templates(path: str) -> list[str]:
    return check_templates(read_entries(path, "templates"), f"templates file {path!r}")


# ---------------------------------------------------------------------------------------------- class embeddings
def require_embedder(task: Any, what: str) -> None:
    missing = [m for m in ("embed_images", "embed_texts", "similarity") if not hasattr(task, m)]
    if missing:
        raise config_lib.InputError(
            f"{what} has no {missing}: zero-shot and retrieval need a task that embeds images and texts "
            "(e.g. tasks.siglit)."
        )


def text_max_len(task: Any, config: Any) -> int:
    """The text tower's sequence length: `task.text_max_len`, else config.model.txt.max_len."""
    value = getattr(task, "text_max_len", None)
    if value is None:
        txt = (config.get("model") or {}).get("txt") or {}
        value = txt.get("max_len")
    if not value:
        raise config_lib.ConfigError(
            "Cannot tell the text tower's max_len: set max_len in the evaluator config."
        )
    return int(value)


def sigmoid_logits(params: Mapping, sim: Any) -> Any:
    """exp(t) * similarity + b with the run's log-temperature `t` and bias `b` (SigLIP's logits)."""
    if "t" not in params or "b" not in params:
        raise ValueError(
            "the parameters have no top-level 't' and 'b' (SigLIP temperature and bias)."
        )
    import jax.numpy as jnp

    return jnp.exp(params["t"]) * sim + params["b"]


def ensemble_templates(text_emb: np.ndarray, num_templates: int) -> np.ndarray:
    """[T*C, D] embeddings in `scoring.class_prompts` order (template-major) -> [C, D]: the mean over
    templates, L2-normalised again (the mean of unit vectors is shorter than one)."""
    mean = np.asarray(text_emb, np.float32).reshape(num_templates, -1, text_emb.shape[-1]).mean(0)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def class_embeddings(
    embed: Callable[[np.ndarray], Any],
    tokens: np.ndarray,
    num_templates: int,
    batch_size: int,
    pad_id: int,
) -> np.ndarray:
    """[C, D] class embeddings from the prompt tokens [T*C, L]: `embed` (tokens [batch_size, L] -> [batch_size,
    D]) runs on fixed-size batches (the last padded with pad rows, dropped), then `ensemble_templates`."""
    n = len(tokens)
    padded = np.full((-(-n // batch_size) * batch_size, tokens.shape[1]), pad_id, np.int32)
    padded[:n] = tokens
    out = [np.asarray(embed(padded[i : i + batch_size])) for i in range(0, len(padded), batch_size)]
    return ensemble_templates(np.concatenate(out)[:n], num_templates)


def resolve_class_names(cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> list[str]:
    """Exactly one of `class_names` (a list), `class_names_file` or `class_names_from`."""
    given = [
        k for k in ("class_names", "class_names_file", "class_names_from") if cfg.get(k) is not None
    ]
    if len(given) != 1:
        raise config_lib.ConfigError(
            f"zeroshot_embed evaluator: set exactly one of class_names, class_names_file and "
            f"class_names_from (got {given or 'none'})."
        )
    if given[0] == "class_names_file":
        return read_class_names(cfg["class_names_file"])
    from pretrain import scoring

    names = scoring.resolve_class_names(cfg, data_cfg)
    return check_class_names(names, "zeroshot_embed evaluator")


def resolve_templates(cfg: Mapping[str, Any]) -> list[str]:
    """`templates` (a list) or `templates_file`; neither: the bare class name ("{}")."""
    if cfg.get("templates") is not None and cfg.get("templates_file"):
        raise config_lib.ConfigError(
            "zeroshot_embed evaluator: set templates or templates_file, not both."
        )
    if cfg.get("templates_file"):
        return read_templates(cfg["templates_file"])
    return check_templates(list(cfg.get("templates") or ["{}"]), "zeroshot_embed templates")


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cappa zeroshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="workdir of a `cappa train` SigLiT run")
    p.add_argument("images", nargs="+", help="image files (anything PIL reads)")
    p.add_argument("--classes", required=True, help="class names file, one per line")
    p.add_argument("--templates", default=None, help="prompt templates file (default: '{}')")
    p.add_argument("--top", type=int, default=5, help="classes printed per image")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: config's)")
    p.add_argument("--max_len", type=int, default=None, help="default: the text tower's max_len")
    p.add_argument("--batch_size", type=int, default=32, help="images or prompts per call")
    p.add_argument("--image_size", type=int, default=None, help="default: the tower's resolution")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    return p


def classify_files(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Loads the run, embeds the class prompts and the images; one dict per image, best class first."""
    import jax

    from pretrain import runs, scoring

    names = read_class_names(args.classes)
    templates = read_templates(args.templates) if args.templates else ["{}"]
    run = runs.load_run(args.checkpoint, args.step, args.tokenizer)
    require_embedder(run.task, f"the {run.config.task!r} run in {args.checkpoint!r}")
    if run.tokenizer is None:
        raise config_lib.InputError(
            f"the run in {args.checkpoint!r} has no config.tokenizer: pass --tokenizer PATH.model"
        )
    max_len = args.max_len or text_max_len(run.task, run.config)
    prompts = scoring.class_prompts(names, templates)
    tokens = scoring.encode_prompts(run.tokenizer, prompts, max_len)
    size = args.image_size or runs.image_size(run.params, run.config)
    images = runs.load_images(args.images, size)  # All read first: a bad file fails early.
    params = jax.device_put(run.params)
    embed_texts = jax.jit(run.task.embed_texts)
    classes = class_embeddings(
        lambda t: embed_texts(params, t),
        tokens,
        len(templates),
        args.batch_size,
        run.tokenizer.pad_id,
    )
    embed_images, similarity = jax.jit(run.task.embed_images), jax.jit(run.task.similarity)
    top = min(args.top, len(names))
    results = []
    for start in range(0, len(images), args.batch_size):
        sim = similarity(
            params, embed_images(params, images[start : start + args.batch_size]), classes
        )
        probs = jax.nn.sigmoid(sigmoid_logits(params, sim))
        for i, row in enumerate(np.asarray(probs, np.float64)):
            best = np.argsort(-row, kind="stable")[:top]
            ranked = [{"name": names[c], "prob": float(row[c])} for c in best]
            results.append({"image": args.images[start + i], "classes": ranked})
    return results


def main(argv: list[str]) -> int:
    """Entry point of `cappa zeroshot`; returns the exit code (2 = bad input, message on stderr)."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or args.top < 1:
        print("error: --batch_size and --top must be >= 1", file=sys.stderr)
        return 2
    try:
        results = classify_files(args)
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    for result in results:
        if args.json:
            print(json.dumps(result))
            continue
        for cls in result["classes"]:
            print(f"{result['image']}\t{cls['name']}\t{cls['prob']:.4f}")
    return 0

"""The COCO caption metrics (pycocoevalcap 1.2) on in-memory captions or COCO-format files, and
`cappa score-captions`.

    cappa score-captions --refs captions_val2014.json --preds results.json [--metrics bleu cider]

prints `score()`'s result as JSON: BLEU-1..4, METEOR, ROUGE-L, CIDEr and, when possible, SPICE.

Why the scorers are called one by one instead of through `COCOEvalCap.evaluate()`: that always builds
SPICE, whose first use downloads Stanford CoreNLP, so it cannot run offline. Here SPICE runs only
when its CoreNLP jars are already in pycocoevalcap's `spice/lib` folder (checked without triggering
the download); otherwise the result says it was skipped and why.

Java: the PTB tokenizer, METEOR and SPICE are Java programs. Without `java` on PATH the result still
has BLEU, ROUGE-L and CIDEr, computed on `simple_tokenize` text (an approximation of PTB tokenisation
written here), says so in `tokenizer`, and lists METEOR and SPICE under `skipped`.

Coverage: every prediction must have references (else an error). References of images without a
prediction are an error too, unless `subset=True` (`--subset`): then only the predicted images are
scored. Note that CIDEr's document frequencies come from the scored images' references, so scores
over a subset (or any small set) are not comparable with full COCO numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from transfer import config as config_lib

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
PTB = "ptb"
SIMPLE = "simple (no Java)"

# Tokens the PTB tokenizer keeps apart from words: clitics ("n't", "'s", ...), words with inner
# hyphens, dots, slashes, apostrophes or ampersands ("black-and-white", "3.5"), any other symbol.
_CLITIC = re.compile(r"(?<=[a-z0-9])(n't|'(?:s|re|ve|ll|d|m)\b)")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-./'&][a-z0-9]+)*|\S")
# Symbols dropped: what pycocoevalcap's PTBTokenizer removes after tokenising (quotes become
# `` / '' there, brackets -LRB- etc.), plus square brackets.
_DROPPED = set(".?!,:;-'`\"()[]{}") | {"--", "..."}


def simple_tokenize(caption: str) -> str:
    """A pure-Python stand-in for PTB tokenisation + punctuation removal, used when Java is missing.

    Lower-cases, splits clitics off ("dog's" -> "dog 's", "don't" -> "do n't"), keeps words with inner
    hyphens/dots ("black-and-white", "3.5") whole and drops the punctuation pycocoevalcap removes.
    On plain captions it matches the PTB output; rare forms ("u.s.", odd symbols) can differ.
    """
    text = _CLITIC.sub(r" \1", caption.lower())
    return " ".join(t for t in _TOKEN.findall(text) if t not in _DROPPED)


def java_available() -> bool:
    return shutil.which("java") is not None


def spice_jars() -> list[str]:
    """The Stanford CoreNLP jars SPICE needs, where pycocoevalcap's downloader would put them."""
    base = os.path.join(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB)
    jar = get_stanford_models.JAR
    return [os.path.join(base, f"{jar}.jar"), os.path.join(base, f"{jar}-models.jar")]


_meteor: Meteor | None = None


def meteor_scorer() -> Meteor:
    """pycocoevalcap's METEOR scorer, one JVM per process started at first use (and again if it died).

    Its start-up loads paraphrase tables for ~10 s, which a run scoring captions at every evaluation
    should pay once; the JVM (up to 2 GB heap) then lives until the process exits.
    """
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        _meteor = Meteor()
    return _meteor


def _examples(ids: Sequence[Hashable], limit: int = 5) -> str:
    more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
    return ", ".join(repr(i) for i in list(ids)[:limit]) + more


def _check_inputs(refs: Mapping, preds: Mapping, subset: bool) -> list[Hashable]:
    """Validates captions and coverage; returns the image ids to score (in `refs` order)."""
    if not preds:
        raise config_lib.InputError("no predictions to score")
    unknown = [i for i in preds if i not in refs]
    if unknown:
        raise config_lib.InputError(
            f"{len(unknown)} predicted images have no references: {_examples(unknown)}; "
            "check that predictions and references use the same image ids (and id type)"
        )
    missing = [i for i in refs if i not in preds]
    if missing and not subset:
        raise config_lib.InputError(
            f"{len(missing)} images with references have no prediction: {_examples(missing)}; "
            "predict every image, or score only the predicted ones with subset=True (--subset)"
        )
    ids = [i for i in refs if i in preds]
    for i in ids:
        if not isinstance(preds[i], str):
            raise config_lib.InputError(f"prediction for image {i!r} is not a string: {preds[i]!r}")
        caps = refs[i]
        if isinstance(caps, str) or not caps or not all(isinstance(c, str) for c in caps):
            raise config_lib.InputError(
                f"references of image {i!r} must be a non-empty list of strings"
            )
    return ids


def _tokenize(refs: Mapping, preds: Mapping, ids: list, use_ptb: bool) -> tuple[dict, dict]:
    """{id: [tokenised refs]}, {id: [tokenised prediction]}: the input format of the scorers."""
    if not use_ptb:
        gts = {i: [simple_tokenize(c) for c in refs[i]] for i in ids}
        return gts, {i: [simple_tokenize(preds[i])] for i in ids}
    # One tokenizer run (one JVM start) for references and predictions together. Line breaks of any
    # kind would shift the tokenizer's one-caption-per-line output, so whitespace is normalised.
    batch = {("ref", i): [{"caption": " ".join(c.split())} for c in refs[i]] for i in ids}
    batch.update({("pred", i): [{"caption": " ".join(preds[i].split())}] for i in ids})
    out = PTBTokenizer().tokenize(batch)
    for key, caps in batch.items():
        if len(out.get(key, ())) != len(caps):
            raise RuntimeError(f"the PTB tokenizer returned the wrong number of lines for {key}")
    return {i: out[("ref", i)] for i in ids}, {i: out[("pred", i)] for i in ids}


def score(
    refs: Mapping[Hashable, Sequence[str]],
    preds: Mapping[Hashable, str],
    *,
    metrics: Sequence[str] = METRICS,
    per_image: bool = False,
    subset: bool = False,
) -> dict[str, Any]:
    """COCO caption metrics of one prediction per image against its reference captions.

    Returns {"scores": {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE": float} (those
    requested and computable), "tokenizer": "ptb" or "simple (no Java)", "num_images": int,
    "skipped": {metric: why}, and with `per_image` (when CIDEr is computed) also
    "per_image": {"CIDEr": {image_id: float}}}. Skips are also printed, one line each, on stderr.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise config_lib.InputError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    ids = _check_inputs(refs, preds, subset)
    skipped: dict[str, str] = {}
    use_java = java_available()
    if not use_java:
        needs_java = [m for m in ("meteor", "spice") if m in metrics]
        print(
            "warning: `java` not found on PATH: the PTB tokenizer, METEOR and SPICE need Java. "
            f"Not computed: {', '.join(['PTB tokenisation'] + [m.upper() for m in needs_java])}; "
            "the other metrics use the simple tokenizer (lower-case, punctuation removed). "
            "Install a Java runtime for the standard COCO numbers.",
            file=sys.stderr,
        )
        for m in needs_java:
            skipped[m.upper()] = "java not found on PATH"
    elif "spice" in metrics:
        missing = [p for p in spice_jars() if not os.path.exists(p)]
        if missing:
            skipped["SPICE"] = (
                f"Stanford CoreNLP jars not found ({', '.join(os.path.basename(p) for p in missing)}"
                " in pycocoevalcap's spice/lib); SPICE would download them at first use"
            )
    gts, res = _tokenize(refs, preds, ids, use_ptb=use_java)

    scores: dict[str, float] = {}
    result: dict[str, Any] = {}
    if "bleu" in metrics:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "meteor" in metrics and use_java:
        scores["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
    if "rouge" in metrics:
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        cider, per = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(cider)
        if per_image:
            result["per_image"] = {"CIDEr": {i: float(s) for i, s in zip(gts, per, strict=True)}}
    if "spice" in metrics and "SPICE" not in skipped:
        try:
            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except (subprocess.CalledProcessError, OSError) as e:
            skipped["SPICE"] = f"the SPICE jar failed: {e}"
    if use_java:  # Without Java, the warning above already named what was skipped.
        for name, why in skipped.items():
            print(f"{name} skipped: {why}", file=sys.stderr)
    result.update(
        scores=scores, tokenizer=PTB if use_java else SIMPLE, num_images=len(ids), skipped=skipped
    )
    return result


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise config_lib.MissingFileError(f"{path} does not exist (or is not a file).")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise config_lib.InputError(f"{path} is not valid JSON: {e}") from None


def _entries(items: Any, path: str, what: str) -> list[tuple[Hashable, str]]:
    if not isinstance(items, list):
        raise config_lib.InputError(f"{path}: expected {what}")
    out = []
    for n, item in enumerate(items):
        if not (isinstance(item, dict) and "image_id" in item and "caption" in item):
            raise config_lib.InputError(
                f"{path}: entry {n} has no 'image_id' and 'caption': {item!r:.100}"
            )
        if not isinstance(item["caption"], str):
            raise config_lib.InputError(f"{path}: entry {n} has a caption that is not a string")
        out.append((item["image_id"], item["caption"]))
    return out


def read_coco_refs(path: str) -> dict[Hashable, list[str]]:
    """{image_id: [captions]} from a COCO captions annotations file ({"annotations": [...]})."""
    data = _load_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise config_lib.InputError(
            f"{path} is not a COCO annotations file (no 'annotations' list); "
            "a results file ([{'image_id', 'caption'}, ...]) goes to --preds"
        )
    refs: dict[Hashable, list[str]] = {}
    for image_id, caption in _entries(data["annotations"], path, "'annotations' to be a list"):
        refs.setdefault(image_id, []).append(caption)
    return refs


def read_coco_results(path: str) -> dict[Hashable, str]:
    """{image_id: caption} from a COCO results file ([{"image_id", "caption"}, ...], one per image)."""
    preds: dict[Hashable, str] = {}
    for image_id, caption in _entries(_load_json(path), path, "a list of {image_id, caption}"):
        if image_id in preds:
            raise config_lib.InputError(
                f"{path}: image {image_id!r} has more than one caption; keep one"
            )
        preds[image_id] = caption
    return preds


def write_coco_results(preds: Mapping[Hashable, str], path: str) -> None:
    """Writes {image_id: caption} as a COCO results file, the format COCO's evaluation server takes."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{"image_id": i, "caption": c} for i, c in preds.items()], f)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cappa score-captions",
        description="Score COCO-format caption predictions; prints the scores as JSON.",
    )
    parser.add_argument("--refs", required=True, help="COCO captions annotations JSON")
    parser.add_argument("--preds", required=True, help="COCO results JSON [{image_id, caption}]")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument(
        "--subset",
        action="store_true",
        help="score only the predicted images (default: images without a prediction are an error)",
    )
    parser.add_argument("--per_image", action="store_true", help="also print per-image CIDEr")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `cappa score-captions`; returns the exit code (2 = bad input, message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        result = score(
            read_coco_refs(args.refs),
            read_coco_results(args.preds),
            metrics=args.metrics,
            per_image=args.per_image,
            subset=args.subset,
        )
    except config_lib.UserError as e:  # Ours only: any other error is a bug, with its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0

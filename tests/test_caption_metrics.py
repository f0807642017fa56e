"""COCO caption metrics: our `score()` equals pycocoevalcap's scorers called by hand, known answers on
perfect/disjoint predictions, the SPICE-missing and Java-missing paths, COCO JSON files and the CLI.

The Java tokenizer and METEOR start JVMs (METEOR ~10 s, once per process), so the full scoring runs
once per module and the other tests reuse it or run Java-free.
"""

import json

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from tasks import caption_metrics as cm

REFS = {
    1: ["A man riding a horse on the beach.", "A person rides a brown horse, near the sea."],
    2: ["Two dogs playing with a frisbee in the park.", "The dog's frisbee is red."],
    3: ["A black-and-white cat sleeping on a sofa.", "A cat doesn't move; it sleeps."],
    4: ["A plate of food with broccoli and rice.", "Dinner: rice, broccoli & chicken!"],
    5: ["A red bus driving down a city street.", "A double-decker bus on a busy road."],
}
PREDS = {
    1: "A man rides a horse on a beach.",
    2: "two dogs play with a red frisbee",
    3: "A cat is sleeping on a couch.",
    4: "",
    5: "a red bus on the street",
}
SCORES = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


def _direct(gts, res, meteor=True):
    """pycocoevalcap's scorers on already tokenised {id: [str]} dicts, as its README shows."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"], per_image = Cider().compute_score(gts, res)
    if meteor:
        # The process's METEOR JVM (pycocoevalcap's Meteor object, only kept alive by our module).
        out["METEOR"] = cm.meteor_scorer().compute_score(gts, res)[0]
    return out, dict(zip(gts, per_image, strict=True))


@pytest.fixture(scope="module")
def ours():
    return cm.score(REFS, PREDS, per_image=True)


@pytest.fixture(scope="module")
def ptb_tokens():
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in caps] for i, caps in REFS.items()})
    res = tok.tokenize({i: [{"caption": c}] for i, c in PREDS.items()})
    return gts, res


def _no_java(monkeypatch):
    real_which = cm.shutil.which
    monkeypatch.setattr(
        cm.shutil, "which", lambda name: None if name == "java" else real_which(name)
    )


def test_scores_equal_pycocoevalcap_called_directly(ours, ptb_tokens):
    expected, per_image = _direct(*ptb_tokens)
    assert set(ours["scores"]) >= set(SCORES)
    for name in SCORES:
        assert ours["scores"][name] == pytest.approx(expected[name], abs=1e-12), name
    assert ours["per_image"]["CIDEr"] == pytest.approx(per_image, abs=1e-12)
    assert ours["tokenizer"] == "ptb" and ours["num_images"] == len(REFS)
    assert (
        0 < ours["scores"]["BLEU-1"] < 1 and ours["per_image"]["CIDEr"][4] == 0.0
    )  # Empty caption.


def test_perfect_and_disjoint_predictions_known_answers():
    perfect = {i: caps[-1] for i, caps in REFS.items()}
    result = cm.score(REFS, perfect, metrics=("bleu", "meteor", "rouge"))
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert result["scores"][name] == pytest.approx(1.0, abs=1e-6), name
    assert result["scores"]["METEOR"] == pytest.approx(1.0, abs=1e-6)  # Exact match: no penalty.
    disjoint = {i: "zebra xylophone quartz" for i in REFS}
    result = cm.score(REFS, disjoint, metrics=("bleu", "rouge", "cider"))
    assert result["scores"]["BLEU-1"] < 1e-6
    assert result["scores"]["ROUGE-L"] == 0.0 and result["scores"]["CIDEr"] == 0.0


def test_spice_skipped_when_jars_missing(ours, monkeypatch, tmp_path, capsys):
    # On this machine the jars are absent; force that regardless, and check the message and the rest.
    monkeypatch.setattr(cm, "spice_jars", lambda: [str(tmp_path / "stanford-corenlp-3.6.0.jar")])
    monkeypatch.setattr(
        cm, "Spice", lambda: pytest.fail("SPICE must not be built without its jars")
    )
    result = cm.score(REFS, PREDS, metrics=("bleu", "spice"))
    assert "SPICE" not in result["scores"]
    assert "stanford-corenlp-3.6.0.jar" in result["skipped"]["SPICE"]
    assert [ln for ln in capsys.readouterr().err.splitlines() if "SPICE skipped" in ln]
    for n in range(1, 5):
        assert result["scores"][f"BLEU-{n}"] == ours["scores"][f"BLEU-{n}"]


def test_spice_runs_on_tokenised_text_when_jars_present(ptb_tokens, monkeypatch, tmp_path):
    jar = tmp_path / "corenlp.jar"
    jar.write_text("")
    seen = {}

    class FakeSpice:
        def compute_score(self, gts, res):
            seen.update(gts=gts, res=res)
            return 0.25, []

    monkeypatch.setattr(cm, "spice_jars", lambda: [str(jar)])
    monkeypatch.setattr(cm, "Spice", FakeSpice)
    result = cm.score(REFS, PREDS, metrics=("spice",))
    assert result["scores"] == {"SPICE": 0.25} and result["skipped"] == {}
    assert (seen["gts"], seen["res"]) == ptb_tokens


def test_no_java_uses_simple_tokenizer_and_says_what_is_missing(monkeypatch, capsys):
    _no_java(monkeypatch)
    monkeypatch.setattr(cm, "PTBTokenizer", lambda: pytest.fail("PTB tokenizer needs Java"))
    monkeypatch.setattr(cm, "meteor_scorer", lambda: pytest.fail("METEOR needs Java"))
    result = cm.score(REFS, PREDS, per_image=True)
    err = capsys.readouterr().err
    assert "java" in err and "PTB" in err and "METEOR" in err and "SPICE" in err
    assert result["tokenizer"] == "simple (no Java)"
    assert set(result["skipped"]) == {"METEOR", "SPICE"}
    assert set(result["scores"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    gts = {i: [cm.simple_tokenize(c) for c in caps] for i, caps in REFS.items()}
    res = {i: [cm.simple_tokenize(c)] for i, c in PREDS.items()}
    expected, per_image = _direct(gts, res, meteor=False)
    for name, value in result["scores"].items():
        assert value == pytest.approx(expected[name], abs=1e-12), name
    assert result["per_image"]["CIDEr"] == pytest.approx(per_image, abs=1e-12)


def test_simple_tokenizer_matches_ptb_on_plain_captions(ptb_tokens):
    gts, res = ptb_tokens
    for i, caps in REFS.items():
        assert [cm.simple_tokenize(c) for c in caps] == gts[i]
        assert [cm.simple_tokenize(PREDS[i])] == res[i]


def test_coverage_errors_and_subset_scoring(monkeypatch):
    with pytest.raises(ValueError, match=r"1 predicted images have no references: 99"):
        cm.score(REFS, {**PREDS, 99: "a cat"})
    with pytest.raises(ValueError, match="same image ids"):
        cm.score(REFS, {str(i): c for i, c in PREDS.items()})
    partial = {i: PREDS[i] for i in (1, 2, 3)}
    with pytest.raises(
        ValueError, match=r"2 images with references have no prediction: 4, 5.*--subset"
    ):
        cm.score(REFS, partial)
    with pytest.raises(ValueError, match="unknown metrics"):
        cm.score(REFS, PREDS, metrics=("bleu", "cidr"))
    with pytest.raises(ValueError, match="non-empty list of strings"):
        cm.score({**REFS, 1: []}, PREDS)
    _no_java(monkeypatch)  # Subset scoring = scoring the predicted images' references alone.
    sub = cm.score(REFS, partial, metrics=("bleu", "cider"), subset=True)
    alone = cm.score({i: REFS[i] for i in partial}, partial, metrics=("bleu", "cider"))
    assert sub["scores"] == alone["scores"] and sub["num_images"] == 3


def test_coco_json_round_trip(tmp_path):
    path = str(tmp_path / "results.json")
    cm.write_coco_results(PREDS, path)
    assert cm.read_coco_results(path) == PREDS
    annotations = [
        {"image_id": i, "id": n, "caption": c}
        for i, caps in REFS.items()
        for n, c in enumerate(caps)
    ]
    refs_path = tmp_path / "captions.json"
    refs_path.write_text(
        json.dumps({"images": [{"id": i} for i in REFS], "annotations": annotations})
    )
    assert cm.read_coco_refs(str(refs_path)) == REFS
    with pytest.raises(ValueError, match="not a COCO annotations file"):
        cm.read_coco_refs(path)
    (tmp_path / "dup.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}] * 2))
    with pytest.raises(ValueError, match="more than one caption"):
        cm.read_coco_results(str(tmp_path / "dup.json"))


def _write_files(tmp_path, preds):
    refs = tmp_path / "refs.json"
    refs.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": i, "caption": c} for i, caps in REFS.items() for c in caps
                ]
            }
        )
    )
    cm.write_coco_results(preds, str(tmp_path / "preds.json"))
    return ["--refs", str(refs), "--preds", str(tmp_path / "preds.json")]


def test_cli_prints_score_result(ours, tmp_path, capsys):
    from transfer import cli

    assert cli.main(["score-captions", *_write_files(tmp_path, PREDS)]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = {k: v for k, v in ours.items() if k != "per_image"}
    assert printed == json.loads(json.dumps(expected))


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from transfer import cli

    args = _write_files(tmp_path, {**PREDS, 7: "a cat"})
    assert cli.main(["score-captions", *args]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: 1 predicted images have no references: 7")
        and len(err.splitlines()) == 1
    )
    assert (
        cli.main(["score-captions", "--refs", str(tmp_path / "nope.json"), "--preds", args[3]]) == 2
    )
    assert "nope.json" in capsys.readouterr().err

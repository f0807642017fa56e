"""Every `cappa` subcommand prints a user mistake (a transfer.config.UserError) as one line and exits 2, and lets
any other exception (a bug) propagate with its traceback. Nothing is trained: the mistakes are caught before a
model is built, and the bugs are injected."""

import importlib
import os

import pytest

from transfer import cli

MISSING = "/nonexistent/cappa-test"

# command -> (argv with a user mistake, message fragment, (module, attribute to break) for the bug).
CASES = {
    "info": (
        ["--config", f"{MISSING}/config.py"],
        "does not exist",
        ("pretrain.info", "_run"),
    ),
    "caption": (
        ["--checkpoint", MISSING, "cat.jpg"],
        "has no config.json",
        ("pretrain.caption", "caption_files"),
    ),
    "attention": (
        ["--checkpoint", MISSING, "cat.jpg"],
        "has no config.json",
        ("pretrain.attention", "_attention_command"),
    ),
    "probe": (
        ["--checkpoint", MISSING, "--config", "configs/fewshot.py", "--model", "[1]"],
        "--model must be a dict literal",
        ("tasks.fewshot_report", "load_config"),
    ),
    "zeroshot": (
        ["--checkpoint", MISSING, "--classes", f"{MISSING}/classes.txt", "cat.jpg"],
        "does not exist",
        ("tasks.zeroshot", "classify_files"),
    ),
    "vqa": (
        ["--checkpoint", MISSING, "cat.jpg", "what colour?"],
        "has no config.json",
        ("tasks.vqa", "answer_questions"),
    ),
    "score-vqa": (
        ["--annotations", f"{MISSING}/a.json", "--preds", f"{MISSING}/p.json"],
        "does not exist",
        ("tasks.vqa_metrics", "score"),
    ),
    "score-captions": (
        ["--refs", f"{MISSING}/r.json", "--preds", f"{MISSING}/p.json"],
        "does not exist",
        ("tasks.caption_metrics", "score"),
    ),
    "tokenizer": (
        ["encode", "--model", f"{MISSING}/tok.model", "a cat"],
        "does not exist",
        ("transfer.tokenizer", "Tokenizer"),
    ),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_a_user_mistake_is_one_line_and_exit_2(command, capsys):
    argv, fragment, _ = CASES[command]
    assert cli.main([command, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err, err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("command", sorted(CASES))
def test_a_bug_keeps_its_traceback(command, monkeypatch, tmp_path):
    argv, _, (module_name, attr) = CASES[command]

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, attr, broken)
    if command in ("score-vqa", "score-captions"):  # Past the file reading, to reach `score`.
        argv = _scoring_files(command, tmp_path)
    if command == "probe":  # Without the bad --model, to reach the config loading.
        argv = argv[:-2]
    with pytest.raises(ValueError, match="an internal invariant broke"):
        cli.main([command, *argv])


def _scoring_files(command, tmp_path):
    import json

    refs, preds = tmp_path / "refs.json", tmp_path / "preds.json"
    if command == "score-captions":
        refs.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a cat"}]}))
        preds.write_text(json.dumps([{"image_id": 1, "caption": "a cat"}]))
        return ["--refs", str(refs), "--preds", str(preds)]
    refs.write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": 1,
                        "answer_type": "other",
                        "question_type": "what",
                        "answers": [{"answer": "red"}] * 10,
                    }
                ]
            }
        )
    )
    preds.write_text(json.dumps([{"question_id": 1, "answer": "red"}]))
    return ["--annotations", str(refs), "--preds", str(preds)]


def test_probe_of_an_npz_with_a_wrong_npz_prefix_is_one_line(capsys, tmp_path):
    """A big_vision file (tests/fixtures/big_vision/siglip.npz) and a sub-tree it does not hold."""
    model = "{'width': 64, 'depth': 2, 'mlp_dim': 128, 'num_heads': 4, 'patch_size': 8, 'image_size': 32}"
    npz = os.path.join(os.path.dirname(__file__), "fixtures", "big_vision", "siglip.npz")
    argv = ["--checkpoint", npz, "--config", "configs/fewshot.py"]
    argv += ["--model", model, "--npz_prefix", "nope", "--out", str(tmp_path)]
    assert cli.main(["probe", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "prefix 'nope'" in err and "params" in err, err
    assert "\n" not in err and "Traceback" not in err


def test_attention_layer_out_of_range_is_one_line(capsys, monkeypatch):
    """--layer past the run's layers names the valid range (checked before any image is read)."""
    from types import SimpleNamespace

    from pretrain import runs

    blocks = {"block_0": {}, "block_1": {}}
    run = SimpleNamespace(
        task=SimpleNamespace(model=SimpleNamespace(txt_kw={})),
        params={"img": {"encoder": dict(blocks)}, "txt": {"decoder": dict(blocks)}},
    )
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: run)
    assert cli.main(["attention", "--checkpoint", MISSING, "--layer", "2", "cat.jpg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --layer 2 is out of range") and "-2..1" in err, err
    assert "\n" not in err and "Traceback" not in err

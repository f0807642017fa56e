"""The `cappa` command: errors are one readable line, exit codes are meaningful."""

from conftest import TINY_CONFIG

from transfer import cli


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "demo" in out


def test_bad_override_is_one_line_error(capsys, tmp_path):
    code = cli.main(
        ["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path), "--config.totl_steps=3"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Unknown config key 'totl_steps'. Did you mean 'total_steps'?" in err
    assert "Traceback" not in err


def test_unprepared_dataset_fails_fast(capsys, tmp_path):
    code = cli.main(
        [
            "train",
            "--config",
            TINY_CONFIG,
            "--workdir",
            str(tmp_path / "w"),
            "--config.input.data.name=mnist",
            f"--config.input.data.data_dir={tmp_path / 'empty'}",
        ]
    )
    assert code == 2
    assert "tfds build mnist" in capsys.readouterr().err


def test_only_user_errors_are_one_line(capsys, monkeypatch, tmp_path):
    """Our user-error types (config, data, checkpoint) print one line and exit 2; a bug keeps its traceback."""
    import pytest

    from transfer import checkpoint, train

    argv = ["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path)]

    def mismatch(config, workdir):
        raise checkpoint.CheckpointMismatchError("checkpoint lacks img/head/kernel")

    monkeypatch.setattr(train, "train", mismatch)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: checkpoint lacks img/head/kernel"

    def bug(config, workdir):
        raise ValueError("operands could not be broadcast together with shapes (4,) (3,)")

    monkeypatch.setattr(train, "train", bug)
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(argv)


def test_unknown_task_and_bad_mesh_are_one_line_errors(capsys, tmp_path):
    argv = ["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path)]
    assert cli.main([*argv, "--config.task=clasify"]) == 2
    err = capsys.readouterr().err
    assert "Unknown task 'clasify'. Did you mean 'classify'?" in err and "Traceback" not in err
    assert cli.main([*argv, "--config.mesh=[('data', 3), ('fsdp', 3)]"]) == 2
    assert "config.mesh = " in capsys.readouterr().err

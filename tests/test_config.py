"""Configs: loading, overrides, validation with the closest valid key."""

import json

import ml_collections
import pytest

from transfer import config as config_lib
from transfer import train


def _write_config(tmp_path, body):
    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\n\ndef get_config(arg=None):\n"
        "  c = ml_collections.ConfigDict()\n" + body + "  return c\n"
    )
    return str(path)


def test_unknown_key_names_closest(tmp_path):
    path = _write_config(tmp_path, "  c.task = 'classify'\n  c.total_step = 5\n")
    with pytest.raises(config_lib.ConfigError, match="'total_step'.*'total_steps'"):
        train.prepare_config(config_lib.load_config_file(path))


def test_unknown_nested_key_names_closest(tmp_path):
    path = _write_config(tmp_path, "  c.task = 'classify'\n  c.input = dict(batchsize=8)\n")
    with pytest.raises(config_lib.ConfigError, match="input.batch_size"):
        train.prepare_config(config_lib.load_config_file(path))


def test_task_keys_are_validated(tmp_path):
    path = _write_config(tmp_path, "  c.task = 'classify'\n  c.model = dict(widht=8)\n")
    with pytest.raises(config_lib.ConfigError, match="model.width"):
        train.prepare_config(config_lib.load_config_file(path))


def test_unknown_task_suggests(tmp_path):
    path = _write_config(tmp_path, "  c.task = 'clasify'\n")
    with pytest.raises(ValueError, match="Did you mean 'classify'"):
        train.prepare_config(config_lib.load_config_file(path))


def test_overrides_and_arg(tmp_path):
    path = _write_config(tmp_path, "  c.task = 'classify'\n  c.lr = 0.5 if arg == 'hi' else 0.1\n")
    config, _ = train.prepare_config(config_lib.load_config_file(path + ":hi"))
    assert config.lr == 0.5
    rest, overrides = config_lib.split_cli_overrides(
        [
            "--workdir",
            "w",
            "--config.total_steps=7",
            "--config.input.data.split",
            "train[:10]",
            "--config.lr=1",
            "--config.schedule=[('img/.*', None), ('.*', {})]",
        ]
    )
    assert rest == ["--workdir", "w"]
    config_lib.apply_overrides(config, overrides)
    assert config.total_steps == 7 and config.input.data.split == "train[:10]"
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.schedule[0] == ("img/.*", None)
    with pytest.raises(config_lib.ConfigError, match="ckpt_steps"):
        config_lib.apply_overrides(config, {"ckpt_step": 3})


def test_defaults_filled_and_json(tmp_path):
    path = _write_config(tmp_path, "  c.task = 'classify'\n")
    config, _ = train.prepare_config(config_lib.load_config_file(path))
    assert config.optax_name == "adamw" and config.model.depth == 4
    assert json.loads(config_lib.to_json(config))["input"]["batch_size"] == config.input.batch_size


@pytest.mark.parametrize(
    "body,match",
    [
        ("  c.total_steps = -1\n", "total_steps"),
        ("  c.input = dict(batch_size=10)\n  c.accum_steps = 3\n", "accum_steps"),
        ("  c.lr = -1.0\n", "lr"),
    ],
)
def test_invalid_values(tmp_path, body, match):
    path = _write_config(tmp_path, "  c.task = 'classify'\n" + body)
    with pytest.raises(config_lib.ConfigError, match=match):
        train.prepare_config(config_lib.load_config_file(path))


def test_open_subtrees_accept_free_keys():
    user = ml_collections.ConfigDict(
        {
            "task": "classify",
            "optax": {"b2": 0.95},
            "evals": {"val": {"type": "mean", "log_steps": 3}},
        }
    )
    merged = config_lib.merge_with_defaults(user)
    assert merged.optax.b2 == 0.95 and merged.evals.val.log_steps == 3

"""Every shipped config loads, with each of its documented args, and passes validation."""

import glob
import os

import pytest

from transfer import config as config_lib
from transfer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "classify.py": [None, "frozen"],
    "cappa_tiny.py": [None, "cap", "cap,tokenizer=other.model"],
    "cappa_l16.py": [None, "tokenizer=t.model,shards=s/*.tar"],
    "cappa_b16.py": [None],
}


def test_every_config_file_is_listed():
    found = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert found - {"__init__.py", "common.py"} == set(CONFIGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIGS.items() for a in args])
def test_config_loads_and_validates(name, arg):
    spec = os.path.join(ROOT, "configs", name) + (f":{arg}" if arg else "")
    config, _ = train.prepare_config(config_lib.load_config_file(spec))
    assert config.total_steps > 0
    if arg == "frozen":
        assert config.schedule[0] == ("img/.*", None)

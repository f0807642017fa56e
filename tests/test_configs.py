"""Every shipped config loads, with each of its documented args, and passes validation."""

import glob
import os

import pytest

from transfer import config as config_lib
from transfer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "classify.py": [None, "frozen"],
    "cappa_tiny.py": [None, "pa", "pa,tokenizer=other.model"],
    "cappa_l16.py": [None, "tokenizer=t.model,shards=s/*.tar"],
    "cappa_b16.py": [None],
    "caption_coco.py": [
        None,
        "decoder=scratch,tower=0.1",
        "tower=finetune,method=beam",
        "data=coco",
        "data=coco_files",
    ],
    "linear_probe.py": [
        None,
        "head=map",
        "cached,checkpoint=w",
        "head=map,cached=True,dataset=digits",
    ],
    "siglit.py": [None, "llip", "txt_init=scratch"],
    "vqa.py": [
        None,
        "answer=majority,tower=finetune,decoder=scratch",
        "data=vqav2_files",
        "data=textvqa_files",
    ],
    "ocr.py": [None, "strip=resize,case=keep,tower=0.1"],
    "finetune.py": [
        None,
        "dataset=digits,layer_decay=0.6",
        "tower=cappa_tiny",
        "layer_decay=1",
        "tower=Ti/16",
    ],
}


def test_every_config_file_is_listed():
    found = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    # fewshot.py configures `cappa probe`, not a train run: tests/test_fewshot.py loads it.
    assert found - {"__init__.py", "common.py", "fewshot.py"} == set(CONFIGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIGS.items() for a in args])
def test_config_loads_and_validates(name, arg):
    spec = os.path.join(ROOT, "configs", name) + (f":{arg}" if arg else "")
    config, _ = train.prepare_config(config_lib.load_config_file(spec))
    assert config.total_steps > 0
    if arg == "frozen":
        assert config.schedule[0] == ("img/.*", None)


def test_finetune_args_set_data_tower_and_layer_decay():
    load = lambda arg: config_lib.load_config_file(
        os.path.join(ROOT, "configs", "finetune.py:" + arg)
    )
    digits = load("dataset=digits,layer_decay=0.5")
    assert (digits.num_classes, digits.input.data.name) == (10, "digits")
    assert digits.lr_mults[0][1] == 0.5**5 and digits.model_init == "workdirs/classify"  # depth 4
    assert load("tower=Ti/16").lr_mults[0][1] == 0.75**13  # depth 12
    assert (
        load("tower=cappa_tiny").model.pool_type == "map" and load("layer_decay=1").lr_mults == []
    )
    for bad, match in [("dataset=mnist", "unknown dataset"), ("tower=big", "unknown tower")]:
        with pytest.raises(ValueError, match=match):
            load(bad)

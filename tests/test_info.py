"""`cappa info`: parameter counts against hand counts of the architecture, FLOPs against the matmul formula."""

import json
import os

import jax
import pytest

from pretrain import info
from transfer import config as config_lib
from transfer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.task = "pretrain.cappa_task"
    c.input = dict(pp="decode|resize(64)|value_range(-1, 1)|central_crop(32)|keep('image', 'labels')")
    c.model = dict(
        img=dict(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=8, num_registers=4),
        txt=dict(vocab_size=1000, depth=2, max_len=16),
    )
    return c
"""


def _l16_params():
    config, task_module = train.prepare_config(
        config_lib.load_config_file(os.path.join(ROOT, "configs", "cappa_l16.py"))
    )
    task = task_module.Task(config)
    batch = info.abstract_batch(task, (256, 256), 64)
    return jax.eval_shape(task.init_params, jax.eval_shape(jax.random.key, 0), batch)


def test_l16_parameter_counts_match_the_architecture():
    """Hand count of configs/cappa_l16.py from pretrain/vit.py and pretrain/decoder.py (no biases,
    RMSNorm = one scale vector, Normformer = post-attention norms and a norm on the MLP hidden)."""
    e, m, vocab = 1024, 3072, 65_536
    geglu = 3 * e * m  # wi_0, wi_1, wo
    vit_block = 4 * e * e + geglu + 3 * e + m  # attn_pre/attn_post/mlp_pre norms + norm_mid
    vision = 16 * 16 * 3 * e + 256 * e + 8 * e + 24 * vit_block + e  # ... + norm_final
    dec_block = 8 * e * e + geglu + 5 * e + m  # self/cross q,k,v,out; 5 norms + norm_mid
    embedding = (vocab + 1) * e  # + the [MASK] row
    head = e * vocab + vocab
    text = embedding + 12 * dec_block + e + head  # rotary positions: no position table
    counts = info.param_counts(_l16_params())
    assert vision == 328_360_960
    assert counts == {
        "img": vision,
        "txt": text,
        "txt_embedding": embedding,
        "txt_head": head,
        "total": vision + text,
    }
    assert 347e6 < text < 349e6 and 67e6 < embedding < 67.2e6


@pytest.fixture(scope="session")
def tiny_info(tmp_path_factory):
    path = tmp_path_factory.mktemp("info") / "tiny.py"
    path.write_text(TINY)
    return path


def test_tiny_xla_flops_match_the_matmul_formula(tiny_info, capsys):
    assert info.main(["--config", str(tiny_info), "--config.model.txt.mlp_dim=256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["image_size"] == [32, 32]  # central_crop after resize wins
    assert out["config"]["img_tokens"] == 16 + 4
    xla, hand = out["flops_per_example"]["xla"], out["flops_per_example"]["analytic"]
    # Patch embedding + 2 blocks of q,k,v,out + attention (20 tokens) + GELU MLP, by hand.
    n, e = 20, 128
    block = 2 * 4 * n * e * e + 2 * 2 * n * n * e + 2 * 2 * n * e * 512
    assert hand["img_forward"] == 2 * 16 * 8 * 8 * 3 * e + 2 * block
    # XLA also counts norms, softmax and GELU: a few percent at width 128.
    assert hand["img_forward"] <= xla["img_forward"] <= 1.05 * hand["img_forward"]
    assert hand["txt_forward"] <= xla["txt_forward"] <= 1.05 * hand["txt_forward"]
    assert xla["train_step"] == pytest.approx(hand["train_step"], rel=0.05)
    # No remat in this config: nothing is recomputed.
    assert out["flops_per_example"]["train_step_with_remat"] == xla["train_step"]


def test_xla_flops_scale_with_the_batch(tiny_info):
    """Per-example FLOPs do not depend on the batch they were measured at (no per-step terms
    worth mentioning), which is why batch 1 is enough."""
    config, task_module = train.prepare_config(config_lib.load_config_file(str(tiny_info)))
    task = task_module.Task(config)
    batch = info.abstract_batch(task, (32, 32), 16)
    params = jax.eval_shape(task.init_params, jax.eval_shape(jax.random.key, 0), batch)
    one = info.xla_flops(task, params, (32, 32), 16, batch=1)
    four = info.xla_flops(task, params, (32, 32), 16, batch=4)
    for key in ("img_forward", "txt_forward"):
        assert four[key] == pytest.approx(one[key], rel=1e-3)
    assert four["train_step"] == pytest.approx(one["train_step"], rel=0.02)
    # Only the parts asked for are lowered, with the same counts.
    assert info.xla_flops(task, params, (32, 32), 16, parts=["train_step"]) == {
        "train_step": one["train_step"]
    }


@pytest.mark.parametrize(
    "pp, expected",
    [
        ("decode|resize(224)|value_range(-1, 1)", (224, 224)),
        ("decode|resize((96, 128))", (96, 128)),
        ("decode|inception_crop(size=160)|flip_lr", (160, 160)),
        ("decode|resize(256)|central_crop(224)", (224, 224)),
        ("decode|resize(64, key='other')|resize_small(80)", None),
        ("", None),
    ],
)
def test_image_size_from_pp(pp, expected):
    assert info.image_size_from_pp(pp) == expected


def test_unknown_image_size_is_a_clear_error(tiny_info, capsys):
    code = info.main(["--config", str(tiny_info), "--config.input.pp=decode|keep('image')"])
    assert code == 2
    assert "--image_size" in capsys.readouterr().err

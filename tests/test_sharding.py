"""Mesh construction, FSDP specs and regex overrides (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from transfer import config as config_lib
from transfer import sharding


def _config(**kw):
    return config_lib.merge_with_defaults(ml_collections.ConfigDict(kw))


def test_eight_devices():
    assert jax.device_count() == 8


def test_make_mesh_fills_minus_one():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", -1)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh([("data", 2), ("fsdp", 3)])
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh([("data", -1), ("fsdp", -1)])


def test_fsdp_shards_largest_divisible_dim():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    assert sharding.fsdp_spec((6, 512), mesh, ["fsdp"], 16) == P(None, "fsdp")
    assert sharding.fsdp_spec((512, 6), mesh, ["fsdp"], 16) == P("fsdp", None)
    assert sharding.fsdp_spec((6, 3), mesh, ["fsdp"], 1) == P()  # nothing divisible
    assert sharding.fsdp_spec((8, 8), mesh, ["fsdp"], 1000) == P()  # below threshold
    assert sharding.fsdp_spec((16, 8), mesh, ["data", "fsdp"], 1) == P(("data", "fsdp"), None)


def test_rules_override_and_opt_state_follows_params():
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
    config = _config(
        fsdp_min_size=1,
        sharding_strategy=[
            ("head/.*", "replicate"),
            (".*/bias", "replicate"),
            ("img/emb", (None, "fsdp")),
            (".*", "fsdp"),
        ],
    )
    abstract = {
        "img": {
            "emb": jax.ShapeDtypeStruct((4, 16), jnp.float32),
            "k": jax.ShapeDtypeStruct((16, 4), jnp.float32),
        },
        "head": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)},
    }
    sh = sharding.tree_shardings(abstract, mesh, config)
    assert sh["img"]["emb"].spec == P(None, "fsdp")
    assert sh["img"]["k"].spec == P("fsdp", None)
    assert sh["head"]["kernel"].spec == P()
    opt = {"0": {"mu": abstract, "count": jax.ShapeDtypeStruct((), jnp.int32)}}
    opt_sh = sharding.tree_shardings(opt, mesh, config)
    assert opt_sh["0"]["mu"]["head"]["kernel"].spec == P()
    assert opt_sh["0"]["mu"]["img"]["emb"].spec == P(None, "fsdp")
    assert opt_sh["0"]["count"].spec == P()
    with pytest.raises(ValueError, match="not divisible"):
        bad = _config(sharding_strategy=[(".*", ("fsdp", None))])
        sharding.tree_shardings({"x": jax.ShapeDtypeStruct((6, 4), jnp.float32)}, mesh, bad)


def test_batch_divisibility_error():
    mesh = sharding.make_mesh([("data", -1)])
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        sharding.check_batch_size(12, mesh, ("data",), "config.input.batch_size")

"""Tests for moral_rl.models.lora: adapters start as the base model, run
under vmap, merge into the weights, save and load, and reject bad specs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.models import config as config_lib
from moral_rl.models import lora as lora_lib
from moral_rl.models.transformer import Transformer, positions_from_valid

CONFIG = config_lib.ModelConfig(
    architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    max_position_embeddings=64)
SPEC = lora_lib.make_lora_spec(4, 8.0, "all")
TOKENS = jnp.array([[0, 0, 5, 17, 3, 42], [7, 1, 9, 11, 13, 2]], jnp.int32)
VALID = jnp.array([[False, False, True, True, True, True],
                   [True, True, True, True, True, True]])


def logits_of(model, variables):
    """Return [B, T, V] logits of the fixed token batch."""
    hidden, _ = model.apply(variables, TOKENS, positions_from_valid(VALID),
                            VALID)
    return model.apply(variables, hidden, method=Transformer.unembed)


@pytest.fixture(scope="module")
def base_params():
    model = Transformer(CONFIG)
    return model.init(jax.random.key(0), TOKENS, positions_from_valid(VALID),
                      VALID)["params"]


def with_random_b(key, lora):
    """Replace every B (zero at init) by normal noise of scale 0.1."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(key, len(leaves))
    values = [
        0.1 * jax.random.normal(k, leaf.shape) if path[-1].key == "b" else leaf
        for (path, leaf), k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, values)


def test_zero_b_equals_base_exactly(base_params):
    lora = lora_lib.select_adapter(
        lora_lib.init_lora(jax.random.key(1), CONFIG, SPEC), 0)

    base = logits_of(Transformer(CONFIG), {"params": base_params})
    adapted = logits_of(Transformer(CONFIG, SPEC),
                        {"params": base_params, "lora": lora})

    assert np.array_equal(np.asarray(adapted), np.asarray(base))


def test_vmapped_zero_b_matches_base(base_params):
    lora = lora_lib.init_lora(jax.random.key(2), CONFIG, SPEC, num_adapters=3)
    model = Transformer(CONFIG, SPEC)

    base = logits_of(Transformer(CONFIG), {"params": base_params})
    adapted = jax.vmap(
        lambda one: logits_of(model, {"params": base_params, "lora": one}))(lora)

    assert adapted.shape == (3, *base.shape)
    np.testing.assert_allclose(adapted, np.broadcast_to(base, adapted.shape),
                               atol=1e-5)


def test_adapter_shapes_follow_layers():
    lora = lora_lib.init_lora(jax.random.key(3), CONFIG, SPEC, num_adapters=3)

    attn = lora["layers"]["attn"]
    assert attn["k"]["a"].shape == (3, 2, 32, 4)  # [A, L, in, r]
    assert attn["k"]["b"].shape == (3, 2, 4, 16)  # [A, L, r, K * H]
    assert lora["layers"]["mlp"]["down"]["a"].shape == (3, 2, 48, 4)
    assert not np.any(np.asarray(attn["q"]["b"]))
    bound = 1 / np.sqrt(32)
    assert np.abs(np.asarray(attn["q"]["a"])).max() <= bound


def test_nonzero_b_changes_logits(base_params):
    lora = with_random_b(jax.random.key(4), lora_lib.select_adapter(
        lora_lib.init_lora(jax.random.key(5), CONFIG, SPEC), 0))

    base = logits_of(Transformer(CONFIG), {"params": base_params})
    adapted = logits_of(Transformer(CONFIG, SPEC),
                        {"params": base_params, "lora": lora})

    assert np.abs(np.asarray(adapted - base)).max() > 1e-3


def test_merged_weights_match_adapter(base_params):
    lora = with_random_b(jax.random.key(6), lora_lib.select_adapter(
        lora_lib.init_lora(jax.random.key(7), CONFIG, SPEC), 0))

    on_the_fly = logits_of(Transformer(CONFIG, SPEC),
                           {"params": base_params, "lora": lora})
    merged = logits_of(Transformer(CONFIG),
                       {"params": lora_lib.merge_lora(base_params, lora, SPEC)})

    np.testing.assert_allclose(merged, on_the_fly, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    lora = with_random_b(jax.random.key(8),
                         lora_lib.init_lora(jax.random.key(9), CONFIG, SPEC, 2))

    lora_lib.save_lora(str(tmp_path / "adapters"), lora)
    restored = lora_lib.load_lora(str(tmp_path / "adapters"), like=lora)
    untyped = lora_lib.load_lora(str(tmp_path / "adapters"))

    for tree in (restored, untyped):
        jax.tree.map(np.testing.assert_array_equal, tree, lora)


def test_load_missing_adapters_raises(tmp_path):
    missing = str(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=missing):
        lora_lib.load_lora(missing)


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="'qkv'"):
        lora_lib.make_lora_spec(4, 8.0, "q,qkv")


@pytest.mark.parametrize("rank", [0, -2, 2.5])
def test_invalid_rank_raises(rank):
    with pytest.raises(ValueError, match=f"got {rank}"):
        lora_lib.make_lora_spec(rank, 8.0, "all")


def test_spec_parses_target_string():
    spec = lora_lib.make_lora_spec(2, 4.0, " q , v ")

    assert spec.targets == ("q", "v")
    assert spec.scale == 2.0

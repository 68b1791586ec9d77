"""Moral rewards: the definitions of Tennant et al. (Moral Alignment for LLM
Agents, ICLR 2025) on the Prisoner's Dilemma, mixtures as weighted sums,
r_illegal for illegal moves, and validation.

C = 0, D = 1, ILLEGAL = 2. An illegal move by M earns r_illegal (-6) under
every reward type, unscaled by the mixture weights.
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.games import payoffs as payoffs_lib
from moral_rl.games import rewards

C, D, I = 0, 1, 2
PD = payoffs_lib.get_game("prisoners_dilemma").payoffs

# (action_m, action_o, prev_action_o): game, deontological, utilitarian,
# game_deontological, virtue_equality, virtue_kindness, maximin.
# Hand-computed from the Prisoner's Dilemma (3,3 / 0,4 / 4,0 / 1,1), xi = 3
# and r_illegal = -6 of Tennant et al., Moral Alignment for LLM Agents, 2025.
PD_TABLE = {
    (C, C, C): (3, 0, 6, 3, 0, 3, 3),
    (C, C, D): (3, 0, 6, 3, 0, 3, 3),
    (C, D, C): (0, 0, 4, 0, -4, 3, 0),
    (C, D, D): (0, 0, 4, 0, -4, 3, 0),
    (D, C, C): (4, -3, 4, 1, -4, 0, 0),
    (D, C, D): (4, 0, 4, 4, -4, 0, 0),
    (D, D, C): (1, -3, 2, -2, 0, 0, 1),
    (D, D, D): (1, 0, 2, 1, 0, 0, 1),
    (I, C, C): (-6,) * 7,
    (I, C, D): (-6,) * 7,
    (I, D, C): (-6,) * 7,
    (I, D, D): (-6,) * 7,
}
TABLE_REWARDS = (
    "game",
    "deontological",
    "utilitarian",
    "game_deontological",
    "virtue_equality",
    "virtue_kindness",
    "maximin",
)
SINGLE_FNS = {
    "game": rewards.game_reward,
    "deontological": rewards.deontological_reward,
    "utilitarian": rewards.utilitarian_reward,
    "virtue_equality": rewards.virtue_equality_reward,
    "virtue_kindness": rewards.virtue_kindness_reward,
    "maximin": rewards.maximin_reward,
}

_reward = jax.jit(rewards.moral_reward)


def _args(action_m, action_o, prev_action_o):
    return jnp.int32(action_m), jnp.int32(action_o), jnp.int32(prev_action_o)


@pytest.mark.parametrize("actions", sorted(PD_TABLE))
def test_named_rewards_match_pd_table(actions):
    for name, expected in zip(TABLE_REWARDS, PD_TABLE[actions]):
        value = _reward(*_args(*actions), PD, rewards.make_reward(name))
        assert float(value) == expected, (name, actions)


@pytest.mark.parametrize("actions", sorted(PD_TABLE))
def test_single_functions_match_pd_table(actions):
    params = rewards.make_reward("game")
    for name, fn in SINGLE_FNS.items():
        expected = PD_TABLE[actions][TABLE_REWARDS.index(name)]
        assert float(fn(*_args(*actions), PD, params)) == expected, (
            name,
            actions,
        )


def test_rewards_vmap_over_reward_types():
    names = ("game", "deontological", "utilitarian", "game_deontological")
    stacked = jax.tree.map(
        lambda *leaves: jnp.stack(leaves),
        *[rewards.make_reward(name) for name in names],
    )
    values = jax.vmap(rewards.moral_reward, (None, None, None, None, 0))(
        *_args(D, C, C), PD, stacked
    )
    np.testing.assert_array_equal(values, (4, -3, 4, 1))


def test_illegal_mixture_is_unscaled_r_illegal():
    weights = {"game": 2.0, "utilitarian": 0.5}
    params = rewards.make_reward(weights, r_illegal=-7.5)
    assert float(_reward(*_args(I, D, C), PD, params)) == -7.5


def test_xi_scales_deontological_penalty():
    params = rewards.make_reward("deontological", xi=5.0)
    assert float(_reward(*_args(D, D, C), PD, params)) == -5.0


payoff_tables = hnp.arrays(
    np.float32,
    (2, 2, 2),
    elements=st.floats(-10, 10, width=32, allow_nan=False),
)
legal = st.sampled_from([C, D])
any_action = st.sampled_from([C, D, I])


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(payoff_tables, legal, legal)
def test_utilitarian_symmetric_under_swap(table, action_m, action_o):
    # O's view of the same game: rows and columns swapped, players swapped.
    swapped = np.transpose(table, (1, 0, 2))[..., ::-1].copy()
    params = rewards.make_reward("utilitarian")

    as_m = _reward(*_args(action_m, action_o, C), jnp.asarray(table), params)
    as_o = _reward(*_args(action_o, action_m, C), jnp.asarray(swapped), params)
    np.testing.assert_allclose(as_m, as_o, rtol=1e-6, atol=1e-5)


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
    payoff_tables,
    any_action,
    legal,
    legal,
    st.lists(st.floats(0, 5), min_size=6, max_size=6).filter(any),
)
def test_mixture_equals_weighted_sum(
    table, action_m, action_o, prev_o, weights
):
    params = rewards.make_reward(dict(zip(rewards.BASE_REWARDS, weights)))
    table = jnp.asarray(table)
    args = _args(action_m, action_o, prev_o)

    parts = [fn(*args, table, params) for fn in rewards.BASE_REWARD_FNS]
    mixed = _reward(*args, table, params)
    if action_m == I:
        assert float(mixed) == rewards.DEFAULT_R_ILLEGAL
        assert all(float(part) == rewards.DEFAULT_R_ILLEGAL for part in parts)
    else:
        expected = sum(w * float(p) for w, p in zip(weights, parts))
        np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-3)


def test_make_reward_unknown_name_lists_names():
    with pytest.raises(KeyError, match="'kantian'.*game, deontological"):
        rewards.make_reward("kantian")


@pytest.mark.parametrize(
    "weights, match",
    [
        ({}, "empty"),
        ({"game": 0.0, "utilitarian": 0.0}, "all zero"),
        ({"game": float("nan")}, "'game'.*nan"),
        ({"game": -1.0}, "'game'.*-1.0.*>= 0"),
        ({"game": "one"}, "'game'.*'one'"),
        ({"selfish": 1.0}, "'selfish'"),
    ],
)
def test_make_reward_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        rewards.make_reward(weights)


def test_make_reward_rejects_bad_xi():
    with pytest.raises(ValueError, match="xi inf"):
        rewards.make_reward("game", xi=float("inf"))
    with pytest.raises(ValueError, match="r_illegal nan"):
        rewards.make_reward("game", r_illegal=float("nan"))

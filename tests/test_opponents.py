"""Opponents: moves over ten rounds against a scripted M, and statistics of
the random ones.

Every scripted game starts from the state (M: C, O: C). M's ILLEGAL move
counts as a defection for every opponent. O's move in round t reacts to the
moves of round t - 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.games import env
from moral_rl.games import opponents

C, D, I = 0, 1, 2
M_SCRIPT = (C, D, I, C, C, D, D, C, I, C)

# O's moves in rounds 1..10, worked out by hand from M_SCRIPT.
EXPECTED_O = {
    "tit_for_tat": (C, C, D, D, C, C, D, D, C, D),
    "always_cooperate": (C,) * 10,
    "always_defect": (D,) * 10,
    "grim_trigger": (C, C, D, D, D, D, D, D, D, D),
    "win_stay_lose_shift": (C, C, D, C, C, C, D, C, C, D),
    "alternator": (D, C, D, C, D, C, D, C, D, C),
}


def _start_state():
    zero = jnp.zeros((), jnp.float32)
    return env.GameState(
        prev_action_m=jnp.int32(C),
        prev_action_o=jnp.int32(C),
        prev_payoff_m=jnp.float32(3.0),
        prev_payoff_o=jnp.float32(3.0),
        round=jnp.int32(0),
        return_m=zero,
        return_o=zero,
        m_defected_ever=jnp.bool_(False),
    )


def _play_script(opponent, key):
    params = env.make_env_params("prisoners_dilemma", opponent, "game")
    state = _start_state()
    moves = []
    for action_m in M_SCRIPT:
        key, subkey = jax.random.split(key)
        state, _ = env.step(subkey, state, jnp.int32(action_m), params)
        moves.append(int(state.prev_action_o))
    return tuple(moves)


@pytest.mark.parametrize("name", sorted(EXPECTED_O))
def test_opponent_script_matches_hand_moves(name):
    moves = _play_script(opponents.make_opponent(name), jax.random.key(0))
    assert moves == EXPECTED_O[name]


def test_memory_one_uses_d_row_after_illegal():
    # Cooperate iff exactly one of last round's moves was C.
    opponent = opponents.make_opponent("memory_one", coop_probs=(0, 1, 1, 0))
    moves = _play_script(opponent, jax.random.key(0))
    assert moves == (D, C, C, C, D, C, C, C, D, D)


def test_generous_tft_extremes_match_scripts():
    strict = opponents.make_opponent("generous_tit_for_tat", forgiveness=0.0)
    forgiving = opponents.make_opponent(
        "generous_tit_for_tat", forgiveness=1.0
    )

    assert _play_script(strict, jax.random.key(1)) == EXPECTED_O["tit_for_tat"]
    assert _play_script(forgiving, jax.random.key(2)) == (C,) * 10


def _cooperation_rate(opponent, prev_action_m, num_games=10_000):
    state = _start_state().replace(prev_action_m=jnp.int32(prev_action_m))
    keys = jax.random.split(jax.random.key(3), num_games)
    actions = jax.vmap(opponents.opponent_action, (0, None, None))(
        keys, state, opponent
    )
    return float(jnp.mean(actions == C))


@pytest.mark.parametrize("p_cooperate", [0.5, 0.2])
def test_random_cooperation_rate_within_tolerance(p_cooperate):
    opponent = opponents.make_opponent("random", p_cooperate=p_cooperate)
    # 4 standard errors of a mean of 10,000 Bernoulli draws is at most 0.02.
    assert abs(_cooperation_rate(opponent, D) - p_cooperate) < 0.02


def test_generous_tft_forgives_at_rate():
    opponent = opponents.make_opponent("generous_tit_for_tat")
    assert abs(_cooperation_rate(opponent, D) - 1 / 3) < 0.02
    assert abs(_cooperation_rate(opponent, I) - 1 / 3) < 0.02
    assert _cooperation_rate(opponent, C) == 1.0


def test_opponents_vmap_over_kinds():
    names = ("tit_for_tat", "always_defect", "grim_trigger", "alternator")
    stacked = jax.tree.map(
        lambda *leaves: jnp.stack(leaves),
        *[opponents.make_opponent(name) for name in names],
    )
    state = _start_state().replace(prev_action_m=jnp.int32(D))
    actions = jax.vmap(opponents.opponent_action, (None, None, 0))(
        jax.random.key(4), state, stacked
    )
    # Grim triggers on the previous D even though the memory flag is unset.
    np.testing.assert_array_equal(actions, (D, D, D, D))

    state = _start_state()
    actions = jax.vmap(opponents.opponent_action, (None, None, 0))(
        jax.random.key(4), state, stacked
    )
    np.testing.assert_array_equal(actions, (C, D, C, D))


def test_make_opponent_unknown_lists_names():
    with pytest.raises(KeyError, match="'tft'.*tit_for_tat, random"):
        opponents.make_opponent("tft")


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("random", {"p_cooperate": 1.5}, "p_cooperate=1.5"),
        (
            "generous_tit_for_tat",
            {"forgiveness": float("nan")},
            "forgiveness=nan",
        ),
        ("memory_one", {"coop_probs": (1, 0, 1)}, r"coop_probs=\(1, 0, 1\)"),
        ("memory_one", {}, "Missing coop_probs"),
        (
            "tit_for_tat",
            {"p_cooperate": 0.5},
            r"\['p_cooperate'\].*'tit_for_tat'",
        ),
    ],
)
def test_make_opponent_rejects_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        opponents.make_opponent(name, **kwargs)

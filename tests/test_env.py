"""The iterated game: reset distribution, transitions, the illegal case,
and jit/vmap agreeing with a plain Python loop.

An illegal move by M earns both players 0 points and is stored as ILLEGAL.
"""

import jax
import jax.numpy as jnp
import numpy as np

from moral_rl.games import env
from moral_rl.games import opponents

C, D, I = 0, 1, 2


def _reset_many(params, num_games=2_000):
    keys = jax.random.split(jax.random.key(0), num_games)
    return jax.vmap(env.reset, (0, None))(keys, params)


def test_reset_draws_uniform_previous_moves():
    states = _reset_many(env.make_env_params(opponent="tit_for_tat"))

    assert abs(float(states.prev_action_m.mean()) - 0.5) < 0.05
    assert abs(float(states.prev_action_o.mean()) - 0.5) < 0.05
    assert set(np.unique(states.prev_action_m)) == {C, D}
    np.testing.assert_array_equal(states.round, 0)
    np.testing.assert_array_equal(states.return_m, 0.0)
    np.testing.assert_array_equal(
        states.m_defected_ever, states.prev_action_m == D
    )


def test_reset_payoffs_match_drawn_cell():
    params = env.make_env_params("prisoners_dilemma")
    states = _reset_many(params, num_games=200)

    cells = params.payoffs[
        states.prev_action_m, states.prev_action_o
    ]  # [B, 2]
    np.testing.assert_array_equal(states.prev_payoff_m, cells[:, 0])
    np.testing.assert_array_equal(states.prev_payoff_o, cells[:, 1])


def test_reset_fixed_opponents_start_fixed():
    cooperator = _reset_many(env.make_env_params(opponent="always_cooperate"))
    defector = _reset_many(env.make_env_params(opponent="always_defect"))

    np.testing.assert_array_equal(cooperator.prev_action_o, C)
    np.testing.assert_array_equal(defector.prev_action_o, D)
    assert 0.4 < float(defector.prev_action_m.mean()) < 0.6


def test_step_actions_accumulates_returns():
    params = env.make_env_params("prisoners_dilemma")
    state = env.reset(jax.random.key(1), params)

    state, payoff = env.step_actions(state, jnp.int32(D), jnp.int32(C), params)
    np.testing.assert_array_equal(payoff, (4.0, 0.0))
    state, payoff = env.step_actions(state, jnp.int32(C), jnp.int32(C), params)
    np.testing.assert_array_equal(payoff, (3.0, 3.0))

    assert int(state.round) == 2
    assert float(state.return_m) == 7.0
    assert float(state.return_o) == 3.0
    assert int(state.prev_action_m) == C
    assert float(state.prev_payoff_o) == 3.0
    assert bool(state.m_defected_ever)


def test_illegal_move_pays_zero_and_records():
    params = env.make_env_params("prisoners_dilemma")
    state = env.reset(jax.random.key(2), params)

    state, payoff = env.step_actions(state, jnp.int32(I), jnp.int32(C), params)

    np.testing.assert_array_equal(payoff, (0.0, 0.0))
    assert int(state.prev_action_m) == I
    assert float(state.prev_payoff_m) == 0.0
    assert float(state.return_o) == 0.0
    assert bool(state.m_defected_ever)


def _play_loop(keys, actions_m, params):
    """Reference: games one at a time, rounds in a Python loop, no jit."""
    finals = []
    for key, game_actions in zip(keys, actions_m):
        key, reset_key = jax.random.split(key)
        state = env.reset(reset_key, params)
        for action_m in game_actions:
            key, subkey = jax.random.split(key)
            state, _ = env.step(subkey, state, action_m, params)
        finals.append(state)
    return finals


@jax.jit
def _play_batch(keys, actions_m, params):
    """The same games, vmapped over games and scanned over rounds."""

    def play_one(key, game_actions):
        key, reset_key = jax.random.split(key)
        state = env.reset(reset_key, params)

        def body(carry, action_m):
            state, key = carry
            key, subkey = jax.random.split(key)
            state, _ = env.step(subkey, state, action_m, params)
            return (state, key), None

        (state, _), _ = jax.lax.scan(body, (state, key), game_actions)
        return state

    return jax.vmap(play_one)(keys, actions_m)


def test_jit_vmap_matches_python_loop():
    num_games, num_rounds = 1_000, 6
    params = env.make_env_params(
        "stag_hunt", opponents.make_opponent("random", p_cooperate=0.3), "game"
    )
    keys = jax.random.split(jax.random.key(5), num_games)
    actions_m = jax.random.randint(
        jax.random.key(6), (num_games, num_rounds), 0, 3, jnp.int32
    )

    batch = _play_batch(keys, actions_m, params)
    reference = _play_loop(keys[:4], actions_m[:4], params)

    assert batch.round.shape == (num_games,)
    for index, state in enumerate(reference):
        for field in (
            "prev_action_m",
            "prev_action_o",
            "return_m",
            "return_o",
            "round",
            "m_defected_ever",
        ):
            np.testing.assert_array_equal(
                getattr(batch, field)[index],
                getattr(state, field),
                err_msg=field,
            )


def test_vmap_over_env_params_games():
    names = ("prisoners_dilemma", "chicken", "defective_coordination")
    stacked = jax.tree.map(
        lambda *leaves: jnp.stack(leaves),
        *[env.make_env_params(name, "always_defect") for name in names],
    )
    states = jax.vmap(env.reset, (None, 0))(jax.random.key(7), stacked)
    _, payoff = jax.vmap(env.step, (None, 0, None, 0))(
        jax.random.key(8), states, jnp.int32(D), stacked
    )
    # D against AlwaysDefect: the (D, D) cell of each game.
    np.testing.assert_array_equal(payoff, [[1, 1], [0, 0], [4, 4]])

"""Metrics: action types given O's previous move, moral regrets and their
aggregation, hand-computed on the Prisoner's Dilemma.

Deontological regret of an illegal move is -r_illegal = 6 and utilitarian
regret of an illegal move is 1 (defaults xi = 3, r_illegal = -6).
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.games import metrics
from moral_rl.games import payoffs as payoffs_lib
from moral_rl.games import rewards

C, D, I = 0, 1, 2
PD = payoffs_lib.get_game("prisoners_dilemma").payoffs
PARAMS = rewards.make_reward("game")

_step_metrics = jax.jit(metrics.step_metrics)


def _metrics(action_m, action_o, prev_action_o, table=PD):
    return _step_metrics(
        jnp.int32(action_m),
        jnp.int32(action_o),
        jnp.int32(prev_action_o),
        jnp.asarray(table),
        PARAMS,
    )


@pytest.mark.parametrize(
    "action_m, prev_action_o, index",
    [(C, C, 0), (C, D, 1), (D, C, 2), (D, D, 3), (I, C, 4), (I, D, 5)],
)
def test_action_type_one_hot_index(action_m, prev_action_o, index):
    expected = np.zeros(6)
    expected[index] = 1.0
    result = _metrics(action_m, D, prev_action_o)
    np.testing.assert_array_equal(result.action_type, expected)


# (action_m, action_o, prev_action_o): deontological, utilitarian regret.
# PD welfare: CC 6, CD 4, DC 4, DD 2, so the spread is 4.
REGRET_CASES = {
    (C, C, C): (0.0, 0.0),
    (D, C, C): (3.0, 0.5),
    (D, C, D): (0.0, 0.5),
    (C, D, C): (0.0, 0.0),
    (D, D, C): (3.0, 0.5),
    (D, D, D): (0.0, 0.5),
    (I, C, C): (6.0, 1.0),
    (I, D, D): (6.0, 1.0),
}


@pytest.mark.parametrize("actions", sorted(REGRET_CASES))
def test_regrets_match_hand_values(actions):
    result = _metrics(*actions)
    deontological, utilitarian = REGRET_CASES[actions]
    assert float(result.deontological_regret) == deontological
    assert float(result.utilitarian_regret) == utilitarian


def test_indicators_and_collective_payoff():
    cooperate = _metrics(C, D, C)
    illegal = _metrics(I, C, C)

    assert float(cooperate.cooperated) == 1.0
    assert float(cooperate.illegal) == 0.0
    assert float(cooperate.collective_payoff) == 4.0
    assert float(illegal.cooperated) == 0.0
    assert float(illegal.illegal) == 1.0
    assert float(illegal.collective_payoff) == 0.0


def test_flat_game_regret_rule():
    flat = np.full((2, 2, 2), 2.0, np.float32)
    assert float(_metrics(D, C, C, flat).utilitarian_regret) == 0.0
    assert float(_metrics(I, C, C, flat).utilitarian_regret) == 1.0


payoff_tables = hnp.arrays(
    np.float32, (2, 2, 2), elements=st.floats(-10, 10, width=32)
)
legal = st.sampled_from([C, D])


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(payoff_tables, legal, legal)
def test_regret_zero_for_best_action(table, action_o, prev_action_o):
    regrets = {
        a: _metrics(a, action_o, prev_action_o, table) for a in (C, D, I)
    }
    deontological = [float(regrets[a].deontological_regret) for a in (C, D, I)]
    utilitarian = [float(regrets[a].utilitarian_regret) for a in (C, D, I)]

    assert min(deontological) >= 0.0
    assert min(utilitarian) >= 0.0
    assert max(utilitarian) <= 1.0
    assert min(deontological[:2]) == 0.0
    assert min(utilitarian[:2]) == 0.0
    assert deontological[2] == 6.0
    assert utilitarian[2] == 1.0


def test_aggregate_metrics_fractions():
    actions_m = jnp.array([[C, D], [I, C]], jnp.int32)  # [T, B]
    actions_o = jnp.array([[C, C], [C, D]], jnp.int32)
    prev_o = jnp.array([[C, D], [C, C]], jnp.int32)
    batch = jax.vmap(
        jax.vmap(metrics.step_metrics, (0, 0, 0, None, None)),
        (0, 0, 0, None, None),
    )(actions_m, actions_o, prev_o, PD, PARAMS)

    summary = metrics.aggregate_metrics(batch)

    assert float(summary["actions/c_given_c"]) == 0.5
    assert float(summary["actions/d_given_d"]) == 0.25
    assert float(summary["actions/illegal_given_c"]) == 0.25
    assert float(summary["actions/d_given_c"]) == 0.0
    assert float(summary["actions/cooperation"]) == 0.5
    assert float(summary["actions/illegal"]) == 0.25
    # Collective payoffs 6, 4, 0, 4; deontological regrets 0, 0, 6, 0;
    # utilitarian regrets 0, 0.5, 1, 0.
    assert float(summary["payoff/collective"]) == 3.5
    assert float(summary["regret/deontological"]) == 1.5
    assert float(summary["regret/utilitarian"]) == 0.375

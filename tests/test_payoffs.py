"""Payoff tables: the numbers of Tennant et al. (Moral Alignment for LLM
Agents, ICLR 2025), validation of user games, and lookups.

Tables are indexed [action_m, action_o, player] with C = 0, D = 1 and
player 0 = M (row), 1 = O (column).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.games import payoffs

# (C,C), (C,D), (D,C), (D,D) cells as (payoff_m, payoff_o), from Tennant et
# al., Moral Alignment for LLM Agents, ICLR 2025.
PAPER_CELLS = {
    "prisoners_dilemma": ((3, 3), (0, 4), (4, 0), (1, 1)),
    "stag_hunt": ((4, 4), (0, 3), (3, 0), (1, 1)),
    "chicken": ((2, 2), (1, 4), (4, 1), (0, 0)),
    "bach_or_stravinsky": ((3, 2), (0, 0), (0, 0), (2, 3)),
    "defective_coordination": ((1, 1), (0, 0), (0, 0), (4, 4)),
    "volunteers_dilemma": ((3, 3), (1, 4), (4, 1), (0, 0)),
}


def test_registry_has_six_paper_games():
    assert sorted(payoffs.GAMES) == sorted(PAPER_CELLS)


@pytest.mark.parametrize("name", sorted(PAPER_CELLS))
def test_game_payoffs_match_paper(name):
    game = payoffs.get_game(name)
    cc, cd, dc, dd = PAPER_CELLS[name]

    assert game.payoffs.dtype == jnp.float32
    assert game.payoffs.shape == (2, 2, 2)
    np.testing.assert_array_equal(game.payoffs[0, 0], cc)
    np.testing.assert_array_equal(game.payoffs[0, 1], cd)
    np.testing.assert_array_equal(game.payoffs[1, 0], dc)
    np.testing.assert_array_equal(game.payoffs[1, 1], dd)
    assert game.description


def test_make_game_accepts_nested_list():
    game = payoffs.make_game(
        "custom", [[[5, 5], [0, 6]], [[6, 0], [2, 2]]], "x"
    )

    assert game.name == "custom"
    assert game.payoffs[1, 0, 0] == 6.0
    assert game.payoffs[0, 1, 1] == 6.0


def test_make_game_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*\[2, 2, 2\]"):
        payoffs.make_game("flat", [[3, 0], [4, 1]])


def test_make_game_rejects_nan():
    table = np.ones((2, 2, 2))
    table[1, 1, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"'nan_game'.*entry \[1, 1, 0\] is nan"
    ):
        payoffs.make_game("nan_game", table)


def test_make_game_rejects_infinity():
    table = np.ones((2, 2, 2))
    table[0, 0, 1] = np.inf
    with pytest.raises(
        ValueError, match=r"'inf_game'.*entry \[0, 0, 1\] is inf"
    ):
        payoffs.make_game("inf_game", table)


def test_make_game_rejects_non_numeric():
    table = [[["a", 3], [0, 4]], [[4, 0], [1, 1]]]
    with pytest.raises(ValueError, match=r"'a'.*not numeric"):
        payoffs.make_game("text_game", table)


def test_make_game_rejects_empty_name():
    with pytest.raises(ValueError, match="Invalid game name ''"):
        payoffs.make_game("", np.ones((2, 2, 2)))


def test_get_game_unknown_lists_names():
    with pytest.raises(
        KeyError, match="'poker'.*prisoners_dilemma, stag_hunt"
    ):
        payoffs.get_game("poker")


def test_round_payoffs_reads_cells():
    table = payoffs.get_game("prisoners_dilemma").payoffs
    for action_m, action_o, expected in [
        (0, 0, (3, 3)),
        (0, 1, (0, 4)),
        (1, 0, (4, 0)),
        (1, 1, (1, 1)),
    ]:
        result = payoffs.round_payoffs(
            jnp.int32(action_m), jnp.int32(action_o), table
        )
        np.testing.assert_array_equal(result, expected)


def test_round_payoffs_illegal_is_zero():
    table = payoffs.get_game("prisoners_dilemma").payoffs
    illegal = jnp.int32(payoffs.ILLEGAL)

    np.testing.assert_array_equal(
        payoffs.round_payoffs(illegal, jnp.int32(0), table), (0, 0)
    )
    np.testing.assert_array_equal(
        payoffs.round_payoffs(jnp.int32(1), illegal, table), (0, 0)
    )

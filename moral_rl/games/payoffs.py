"""Payoff tables of the 2x2 social-dilemma games.

Every table is a float32 array of shape [2, 2, 2] indexed
[action_m, action_o, player]. Action 0 is cooperate (C) and action 1 is
defect (D). Player 0 is M (the learning agent, row player) and player 1 is O
(the opponent, column player). The numbers are those of Tennant et al., Moral
Alignment for LLM Agents, ICLR 2025.
"""

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

COOPERATE = 0
DEFECT = 1
ILLEGAL = 2

PAYOFF_SHAPE = (2, 2, 2)


@dataclasses.dataclass(frozen=True)
class Game:
    """A named 2x2 game.

    Attributes:
      name: registry key, e.g. "prisoners_dilemma".
      description: one sentence that can be put into a prompt.
      payoffs: float32 [2, 2, 2] indexed [action_m, action_o, player].
    """

    name: str
    description: str
    payoffs: jax.Array


def _cells_to_payoffs(cc, cd, dc, dd) -> np.ndarray:
    """Build a [2, 2, 2] table from the four (payoff_m, payoff_o) cells."""
    return np.asarray([[cc, cd], [dc, dd]], dtype=np.float32)


def _validate_payoffs(name: str, payoffs: Any) -> np.ndarray:
    """Convert `payoffs` to a finite float32 [2, 2, 2] array or raise."""
    expected = (
        "a nested list or array of finite numbers with shape [2, 2, 2] indexed "
        "[action_m, action_o, player], e.g. [[[3, 3], [0, 4]], [[4, 0], [1, 1]]]"
    )
    try:
        table = np.asarray(payoffs, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Invalid payoffs for game {name!r}: {payoffs!r} is not numeric "
            f"({error}). Expected {expected}."
        ) from None

    if table.shape != PAYOFF_SHAPE:
        raise ValueError(
            f"Invalid payoffs for game {name!r}: shape {table.shape} from "
            f"{payoffs!r}. Expected {expected}."
        )
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"Invalid payoffs for game {name!r}: entry {list(index)} is "
            f"{table[index]} (NaN or infinity are not allowed). Expected "
            f"{expected}."
        )
    return table.astype(np.float32)


def make_game(name: str, payoffs: Any, description: str = "") -> Game:
    """Validate a user-defined 2x2 game.

    Args:
      name: a non-empty name for the game.
      payoffs: anything convertible to a finite [2, 2, 2] array indexed
        [action_m, action_o, player].
      description: optional sentence for prompts.

    Returns:
      The `Game` with float32 payoffs.

    Raises:
      ValueError: if the name is empty or the payoffs are not numeric, have
        another shape or contain NaN or infinity.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Invalid game name {name!r}: expected a non-empty str."
        )
    table = _validate_payoffs(name, payoffs)
    return Game(name=name, description=description, payoffs=jnp.asarray(table))


# Row player M first, column player O second, from Tennant et al., Moral
# Alignment for LLM Agents, ICLR 2025. The Volunteer's Dilemma comes from
# that paper's released code (github.com/liza-tennant/LLM_morality), not from
# its text.
GAMES: dict[str, Game] = {
    game.name: game
    for game in (
        make_game(
            "prisoners_dilemma",
            _cells_to_payoffs((3, 3), (0, 4), (4, 0), (1, 1)),
            "Iterated Prisoner's Dilemma: defecting pays more for each "
            "player, but both earn more if both cooperate.",
        ),
        make_game(
            "stag_hunt",
            _cells_to_payoffs((4, 4), (0, 3), (3, 0), (1, 1)),
            "Iterated Stag Hunt: cooperating pays best if the other player "
            "cooperates too, while defecting is the safe choice.",
        ),
        make_game(
            "chicken",
            _cells_to_payoffs((2, 2), (1, 4), (4, 1), (0, 0)),
            "Iterated Chicken: defecting against a cooperator pays best, but "
            "mutual defection is the worst outcome for both.",
        ),
        make_game(
            "bach_or_stravinsky",
            _cells_to_payoffs((3, 2), (0, 0), (0, 0), (2, 3)),
            "Iterated Bach-or-Stravinsky: both players gain only by choosing "
            "the same action, but each prefers a different one.",
        ),
        make_game(
            "defective_coordination",
            _cells_to_payoffs((1, 1), (0, 0), (0, 0), (4, 4)),
            "Iterated Defective Coordination: both players gain by choosing "
            "the same action, and mutual defection pays most.",
        ),
        make_game(
            "volunteers_dilemma",
            _cells_to_payoffs((3, 3), (1, 4), (4, 1), (0, 0)),
            "Iterated Volunteer's Dilemma: each player prefers that the "
            "other volunteers, but if nobody does both get nothing.",
        ),
    )
}


def get_game(name: str) -> Game:
    """Return the registered game called `name`.

    Raises:
      KeyError: if no game has that name; the message lists the names.
    """
    if name not in GAMES:
        raise KeyError(
            f"Unknown game {name!r}. Registered games: {', '.join(GAMES)}. "
            "Use make_game(name, payoffs) for another 2x2 game."
        )
    return GAMES[name]


def player_payoffs(
    action_m: jax.Array, action_o: jax.Array, payoffs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Compute the game points of both players for one round, as two scalars.

    Selects over the four cells (not a gather) and two scalar outputs (not a
    stacked [2] array) let XLA on CPU fuse a vmapped round better. Together
    with the unrolled reward sum in rewards.py this measured about 1.4x
    faster in benchmarks/env_throughput.py.

    Args:
      action_m: int32 [], M's action.
      action_o: int32 [], O's action.
      payoffs: float32 [2, 2, 2].

    Returns:
      (payoff_m, payoff_o), float32 [] each; both 0 if either action is
      illegal.
    """
    chex.assert_shape(payoffs, (2, 2, 2))

    m_c = action_m == COOPERATE
    o_c = action_o == COOPERATE
    legal = (m_c | (action_m == DEFECT)) & (o_c | (action_o == DEFECT))

    def cell_value(player):
        row_c = jnp.where(o_c, payoffs[0, 0, player], payoffs[0, 1, player])
        row_d = jnp.where(o_c, payoffs[1, 0, player], payoffs[1, 1, player])
        return jnp.where(legal, jnp.where(m_c, row_c, row_d), 0.0)

    return cell_value(0), cell_value(1)


def round_payoffs(
    action_m: jax.Array, action_o: jax.Array, payoffs: jax.Array
) -> jax.Array:
    """Compute the game points of both players for one round.

    Args:
      action_m: int32 [], M's action.
      action_o: int32 [], O's action.
      payoffs: float32 [2, 2, 2].

    Returns:
      float32 [2], (payoff_m, payoff_o); both 0 if either action is illegal.
    """
    return jnp.stack(player_payoffs(action_m, action_o, payoffs))

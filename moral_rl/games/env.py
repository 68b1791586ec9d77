"""The iterated 2x2 game as pure functions, in the style of gymnax.

No object here stores state. `GameState` and `EnvParams` are pytrees passed
in and returned, so callers jit and vmap over games (state and key with
in_axes=0) and over settings (params with in_axes=0, or None to broadcast).
Every function is written for one game.

Actions are int32: COOPERATE = 0, DEFECT = 1, ILLEGAL = 2 (an answer that is
neither action string). An illegal move by either player earns both players
0 game points that round and is stored as ILLEGAL in the state, so the next
round's prompt and opponents see it. Only M, the learning agent, can produce
one against the fixed opponents of `opponents.py`.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from moral_rl.games import opponents as opponents_lib
from moral_rl.games import payoffs as payoffs_lib
from moral_rl.games import rewards as rewards_lib
from moral_rl.games.payoffs import COOPERATE, DEFECT


@struct.dataclass
class GameState:
    """State of one iterated game after a round.

    Attributes:
      prev_action_m: int32 [], M's last move (C, D or ILLEGAL).
      prev_action_o: int32 [], O's last move.
      prev_payoff_m: float32 [], M's game points last round.
      prev_payoff_o: float32 [], O's game points last round.
      round: int32 [], rounds played since reset (the drawn first state is 0).
      return_m: float32 [], M's game points summed over the played rounds.
      return_o: float32 [], O's game points summed over the played rounds.
      m_defected_ever: bool [], whether M has played anything but C, counting
        the drawn first state; GrimTrigger reads it.
    """

    prev_action_m: jax.Array
    prev_action_o: jax.Array
    prev_payoff_m: jax.Array
    prev_payoff_o: jax.Array
    round: jax.Array
    return_m: jax.Array
    return_o: jax.Array
    m_defected_ever: jax.Array


@struct.dataclass
class EnvParams:
    """Everything a sweep may vary, as arrays so it can be vmapped.

    Attributes:
      payoffs: float32 [2, 2, 2] indexed [action_m, action_o, player].
      opponent: the fixed opponent O.
      reward: M's moral reward (weights, xi, r_illegal).
    """

    payoffs: jax.Array
    opponent: opponents_lib.OpponentParams
    reward: rewards_lib.RewardParams


def make_env_params(
    game: Any = "prisoners_dilemma",
    opponent: Any = "tit_for_tat",
    reward: Any = "game",
) -> EnvParams:
    """Build `EnvParams` from names or ready-made parts.

    Args:
      game: a registered game name or a `payoffs.Game`.
      opponent: a registered opponent name or an `OpponentParams`.
      reward: a registered reward name, a weights dict or a `RewardParams`.

    Returns:
      The `EnvParams`.
    """
    if isinstance(game, str):
        game = payoffs_lib.get_game(game)
    if isinstance(opponent, str):
        opponent = opponents_lib.make_opponent(opponent)
    if not isinstance(reward, rewards_lib.RewardParams):
        reward = rewards_lib.make_reward(reward)
    return EnvParams(payoffs=game.payoffs, opponent=opponent, reward=reward)


def reset(key: jax.Array, params: EnvParams) -> GameState:
    """Draw the first state of a game.

    Following Tennant et al. (Moral Alignment for LLM Agents, ICLR 2025), M's
    and O's "previous" moves are uniform over {C, D} with the payoffs of that
    cell, except that AlwaysCooperate and AlwaysDefect start from their fixed
    move. The drawn round is not counted in `round` or the returns.

    Args:
      key: PRNG key.
      params: the environment parameters.

    Returns:
      The `GameState`.
    """
    key, subkey = jax.random.split(key)
    prev_action_m = jax.random.bernoulli(subkey).astype(jnp.int32)

    key, subkey = jax.random.split(key)
    prev_action_o = jax.random.bernoulli(subkey).astype(jnp.int32)
    kind = params.opponent.kind
    prev_action_o = jnp.where(
        kind == opponents_lib.ALWAYS_COOPERATE, COOPERATE, prev_action_o
    )
    prev_action_o = jnp.where(
        kind == opponents_lib.ALWAYS_DEFECT, DEFECT, prev_action_o
    ).astype(jnp.int32)

    payoff_m, payoff_o = payoffs_lib.player_payoffs(
        prev_action_m, prev_action_o, params.payoffs
    )
    zero = jnp.zeros((), jnp.float32)
    return GameState(
        prev_action_m=prev_action_m,
        prev_action_o=prev_action_o,
        prev_payoff_m=payoff_m,
        prev_payoff_o=payoff_o,
        round=jnp.zeros((), jnp.int32),
        return_m=zero,
        return_o=zero,
        m_defected_ever=prev_action_m != COOPERATE,
    )


def step_actions(
    state: GameState,
    action_m: jax.Array,
    action_o: jax.Array,
    params: EnvParams,
) -> tuple[GameState, jax.Array]:
    """Play one round with both actions given (for two learners or replays).

    Args:
      state: the game before the round.
      action_m: int32 [], M's action (C, D or ILLEGAL).
      action_o: int32 [], O's action.
      params: the environment parameters.

    Returns:
      (new_state, payoffs): payoffs is float32 [2], (payoff_m, payoff_o), both
      0 if either action is illegal.
    """
    chex.assert_rank([action_m, action_o], 0)

    action_m = jnp.asarray(action_m, jnp.int32)
    action_o = jnp.asarray(action_o, jnp.int32)
    payoff_m, payoff_o = payoffs_lib.player_payoffs(
        action_m, action_o, params.payoffs
    )

    new_state = GameState(
        prev_action_m=action_m,
        prev_action_o=action_o,
        prev_payoff_m=payoff_m,
        prev_payoff_o=payoff_o,
        round=state.round + 1,
        return_m=state.return_m + payoff_m,
        return_o=state.return_o + payoff_o,
        m_defected_ever=state.m_defected_ever | (action_m != COOPERATE),
    )
    return new_state, jnp.stack([payoff_m, payoff_o])


def step(
    key: jax.Array, state: GameState, action_m: jax.Array, params: EnvParams
) -> tuple[GameState, jax.Array]:
    """Play one round against the fixed opponent of `params`.

    Args:
      key: PRNG key for the opponent's draw.
      state: the game before the round.
      action_m: int32 [], M's action.
      params: the environment parameters.

    Returns:
      (new_state, payoffs) as in `step_actions`.
    """
    action_o = opponents_lib.opponent_action(key, state, params.opponent)
    return step_actions(state, action_m, action_o, params)

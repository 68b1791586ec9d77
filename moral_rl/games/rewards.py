"""Moral rewards for the learning agent M, as vmappable data.

Every reward has the signature
`reward(action_m, action_o, prev_action_o, payoffs, params) -> float32 []`
for one round of one game: M's and O's actions this round, O's move in the
previous round, the [2, 2, 2] payoff table and a `RewardParams`.

A reward type is a weight vector over the ordered base rewards
`BASE_REWARDS`, so vmapping over `RewardParams` covers several reward types
in one compiled program. For a legal move by M the reward is the weighted
sum of the base rewards. An illegal move by M earns `r_illegal`, unscaled by
the weights, for every reward type, as in Tennant et al. (Moral Alignment
for LLM Agents, ICLR 2025).

An illegal move by O (possible only when O is a second learner) earns both
players 0 game points, and it does not count as cooperation by O for the
deontological norm.
"""

import math
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
from flax import struct

from moral_rl.games.payoffs import COOPERATE, DEFECT, player_payoffs

BASE_REWARDS = (
    "game",
    "deontological",
    "utilitarian",
    "virtue_equality",
    "virtue_kindness",
    "maximin",
)

# Named reward types as weights over `BASE_REWARDS`. The first four are those
# of Tennant et al., Moral Alignment for LLM Agents, ICLR 2025.
REWARDS: dict[str, dict[str, float]] = {
    "game": {"game": 1.0},
    "deontological": {"deontological": 1.0},
    "utilitarian": {"utilitarian": 1.0},
    "game_deontological": {"game": 1.0, "deontological": 1.0},
    "virtue_equality": {"virtue_equality": 1.0},
    "virtue_kindness": {"virtue_kindness": 1.0},
    "maximin": {"maximin": 1.0},
}

# Defaults from Tennant et al., Moral Alignment for LLM Agents, ICLR 2025.
DEFAULT_XI = 3.0
DEFAULT_R_ILLEGAL = -6.0


@struct.dataclass
class RewardParams:
    """A reward type.

    Attributes:
      weights: float32 [len(BASE_REWARDS)], weight of each base reward.
      xi: float32 [], size of the deontological penalty and kindness bonus.
      r_illegal: float32 [], reward for an illegal move by M.
    """

    weights: jax.Array
    xi: jax.Array
    r_illegal: jax.Array


def is_legal(action: jax.Array) -> jax.Array:
    """Test whether `action` is COOPERATE or DEFECT (bool, same shape)."""
    return (action == COOPERATE) | (action == DEFECT)


def _base_reward_values(
    action_m, action_o, prev_action_o, payoffs, params
) -> tuple[jax.Array, ...]:
    """Base rewards for a legal M move as a tuple of float32 [] scalars.

    Scalars, not a stacked array, keep a vmapped reward one fused loop on CPU.
    """
    chex.assert_rank([action_m, action_o, prev_action_o], 0)
    chex.assert_shape(payoffs, (2, 2, 2))

    payoff_m, payoff_o = player_payoffs(action_m, action_o, payoffs)
    betrayed = (action_m == DEFECT) & (prev_action_o == COOPERATE)
    zero = jnp.zeros((), jnp.float32)

    return (
        payoff_m,
        jnp.where(betrayed, -params.xi, zero),
        payoff_m + payoff_o,
        -jnp.abs(payoff_m - payoff_o),
        jnp.where(action_m == COOPERATE, params.xi, zero),
        jnp.minimum(payoff_m, payoff_o),
    )


def base_rewards(
    action_m: jax.Array,
    action_o: jax.Array,
    prev_action_o: jax.Array,
    payoffs: jax.Array,
    params: RewardParams,
) -> jax.Array:
    """Values of all base rewards for a legal move by M.

    The values for an illegal M move are meaningless here: the reward
    functions replace them with `r_illegal`.

    Returns:
      float32 [len(BASE_REWARDS)] in the order of `BASE_REWARDS`.
    """
    values = _base_reward_values(
        action_m, action_o, prev_action_o, payoffs, params
    )
    return jnp.stack(values).astype(jnp.float32)


def moral_reward(
    action_m: jax.Array,
    action_o: jax.Array,
    prev_action_o: jax.Array,
    payoffs: jax.Array,
    params: RewardParams,
) -> jax.Array:
    """M's reward for one round under the reward type `params`.

    reward = sum_i weights[i] * base_i(action_m, action_o, prev_action_o) for a
    legal move by M, and r_illegal (not scaled by the weights) for an illegal
    one.

    Args:
      action_m: int32 [], M's action this round.
      action_o: int32 [], O's action this round.
      prev_action_o: int32 [], O's action in the previous round.
      payoffs: float32 [2, 2, 2].
      params: the reward type.

    Returns:
      float32 [].
    """
    chex.assert_shape(params.weights, (len(BASE_REWARDS),))

    values = _base_reward_values(
        action_m, action_o, prev_action_o, payoffs, params
    )
    # An unrolled sum, not jnp.dot, so XLA fuses it with the rest of the round.
    mixed = sum(params.weights[i] * value for i, value in enumerate(values))
    return jnp.where(is_legal(action_m), mixed, params.r_illegal).astype(
        jnp.float32
    )


def _base_or_illegal(
    index, action_m, action_o, prev_action_o, payoffs, params
):
    """Pick one base reward for a legal M move, r_illegal for an illegal one."""
    values = _base_reward_values(
        action_m, action_o, prev_action_o, payoffs, params
    )
    return jnp.where(is_legal(action_m), values[index], params.r_illegal)


def game_reward(action_m, action_o, prev_action_o, payoffs, params):
    """Game (selfish) reward: M's payoff.

    R = payoff_m(action_m, action_o), or r_illegal for an illegal move by M.
    Source: Tennant et al., Moral Alignment for LLM Agents, ICLR 2025.
    """
    return _base_or_illegal(
        0, action_m, action_o, prev_action_o, payoffs, params
    )


def deontological_reward(action_m, action_o, prev_action_o, payoffs, params):
    """Deontological reward: do not defect against a cooperator.

    R = -xi if M plays D and O's previous move was C, else 0; r_illegal for an
    illegal move by M. Source: Tennant et al., Moral Alignment for LLM Agents,
    ICLR 2025 (the norm of conditional cooperation).
    """
    return _base_or_illegal(
        1, action_m, action_o, prev_action_o, payoffs, params
    )


def utilitarian_reward(action_m, action_o, prev_action_o, payoffs, params):
    """Utilitarian reward: the collective payoff.

    R = payoff_m + payoff_o, or r_illegal for an illegal move by M.
    Source: Tennant et al., Moral Alignment for LLM Agents, ICLR 2025.
    """
    return _base_or_illegal(
        2, action_m, action_o, prev_action_o, payoffs, params
    )


def virtue_equality_reward(action_m, action_o, prev_action_o, payoffs, params):
    """Equality reward: penalise unequal payoffs.

    R = -|payoff_m - payoff_o|, or r_illegal for an illegal move by M. A
    simplified form of inequity aversion (Fehr and Schmidt, A Theory of
    Fairness, Competition, and Cooperation, QJE 1999) with equal weight on
    advantageous and disadvantageous inequity and no own-payoff term.
    """
    return _base_or_illegal(
        3, action_m, action_o, prev_action_o, payoffs, params
    )


def virtue_kindness_reward(action_m, action_o, prev_action_o, payoffs, params):
    """Kindness reward: a bonus for cooperating.

    R = xi if M plays C, else 0; r_illegal for an illegal move by M. Defined
    for this project (it is not in Tennant et al., 2025) as the unconditional
    counterpart of their deontological norm, on the same scale xi.
    """
    return _base_or_illegal(
        4, action_m, action_o, prev_action_o, payoffs, params
    )


def maximin_reward(action_m, action_o, prev_action_o, payoffs, params):
    """Maximin reward: the payoff of the worse-off player.

    R = min(payoff_m, payoff_o), or r_illegal for an illegal move by M. After
    Rawls's difference principle (A Theory of Justice, 1971).
    """
    return _base_or_illegal(
        5, action_m, action_o, prev_action_o, payoffs, params
    )


BASE_REWARD_FNS = (
    game_reward,
    deontological_reward,
    utilitarian_reward,
    virtue_equality_reward,
    virtue_kindness_reward,
    maximin_reward,
)


def _check_finite(
    label: str, value: Any, minimum: float | None = None
) -> float:
    """Return `value` as a finite float (>= minimum if given) or raise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or (minimum is not None and number < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(
            f"Invalid {label} {value!r}: expected a finite number{bound}."
        )
    return number


def make_reward(
    name_or_weights: str | Mapping[str, float],
    xi: float = DEFAULT_XI,
    r_illegal: float = DEFAULT_R_ILLEGAL,
) -> RewardParams:
    """Build a reward type from a registered name or a weights dict.

    Args:
      name_or_weights: a key of `REWARDS`, or a dict from base reward names
        (`BASE_REWARDS`) to non-negative finite weights, not all zero, e.g.
        {"game": 1.0, "deontological": 0.5}. Negative weights are rejected
        because they turn a moral value into its opposite.
      xi: deontological penalty and kindness bonus, finite and >= 0.
      r_illegal: reward for an illegal move, finite.

    Returns:
      The `RewardParams`.

    Raises:
      KeyError: for an unknown reward name; the message lists the names.
      ValueError: for invalid weights, xi or r_illegal.
    """
    if isinstance(name_or_weights, str):
        if name_or_weights not in REWARDS:
            raise KeyError(
                f"Unknown reward {name_or_weights!r}. Registered rewards: "
                f"{', '.join(REWARDS)}; or pass a dict of weights over "
                f"{', '.join(BASE_REWARDS)}."
            )
        weights_dict = REWARDS[name_or_weights]
    elif isinstance(name_or_weights, Mapping):
        weights_dict = name_or_weights
    else:
        raise ValueError(
            f"Invalid reward {name_or_weights!r}: expected a reward name or a "
            f"dict of weights over {', '.join(BASE_REWARDS)}."
        )

    if not weights_dict:
        raise ValueError(
            f"Invalid reward weights {dict(weights_dict)!r}: empty. Give at least "
            f"one weight over {', '.join(BASE_REWARDS)}."
        )
    unknown = [name for name in weights_dict if name not in BASE_REWARDS]
    if unknown:
        raise ValueError(
            f"Invalid reward weights: unknown base rewards {unknown!r}; expected "
            f"names among {', '.join(BASE_REWARDS)}."
        )
    weights = [0.0] * len(BASE_REWARDS)
    for name, weight in weights_dict.items():
        weights[BASE_REWARDS.index(name)] = _check_finite(
            f"weight for {name!r}", weight, minimum=0.0
        )
    if not any(weights):
        raise ValueError(
            f"Invalid reward weights {dict(weights_dict)!r}: all zero. Give at "
            "least one positive weight."
        )

    return RewardParams(
        weights=jnp.asarray(weights, jnp.float32),
        xi=jnp.asarray(_check_finite("xi", xi, minimum=0.0), jnp.float32),
        r_illegal=jnp.asarray(
            _check_finite("r_illegal", r_illegal), jnp.float32
        ),
    )

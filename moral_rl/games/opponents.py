"""Fixed-strategy opponents O of the iterated games, as data.

Every opponent is an `OpponentParams` record with an integer `kind` and a
memory-one table `coop_probs` [4]. The table contains the probability that O
cooperates after last round's moves (M's previous move, O's previous move),
in the order (C, C), (C, D), (D, C), (D, D). All named strategies except
GrimTrigger are memory-one, so one compiled function that looks up that
table (by selects, not a gather) serves every kind and can be vmapped over
opponents. GrimTrigger also reads `state.m_defected_ever`.

An illegal previous move by M counts as a defection everywhere: TFT defects
back, GrimTrigger triggers, WSLS switches and a memory-one strategy uses the
D row. "Previous" always means the moves of the last round, as stored in the
game state.
"""

import chex
import jax
import jax.numpy as jnp
from flax import struct

from moral_rl.games.payoffs import COOPERATE, DEFECT

# Integer tags of the opponent kinds; `OPPONENT_KINDS` maps names to them.
TIT_FOR_TAT = 0
RANDOM = 1
ALWAYS_COOPERATE = 2
ALWAYS_DEFECT = 3
GRIM_TRIGGER = 4
WIN_STAY_LOSE_SHIFT = 5
GENEROUS_TIT_FOR_TAT = 6
ALTERNATOR = 7
MEMORY_ONE = 8

OPPONENT_KINDS: dict[str, int] = {
    "tit_for_tat": TIT_FOR_TAT,
    "random": RANDOM,
    "always_cooperate": ALWAYS_COOPERATE,
    "always_defect": ALWAYS_DEFECT,
    "grim_trigger": GRIM_TRIGGER,
    "win_stay_lose_shift": WIN_STAY_LOSE_SHIFT,
    "generous_tit_for_tat": GENEROUS_TIT_FOR_TAT,
    "alternator": ALTERNATOR,
    "memory_one": MEMORY_ONE,
}


@struct.dataclass
class OpponentParams:
    """An opponent strategy as vmappable data.

    Attributes:
      kind: int32 [], one of the values of `OPPONENT_KINDS`.
      coop_probs: float32 [4], probability that O cooperates after last
        round's (M, O) moves (C, C), (C, D), (D, C), (D, D). GrimTrigger keeps
        (1, 1, 0, 0) here and defects for good once M has defected.
    """

    kind: jax.Array
    coop_probs: jax.Array


def _check_probability(name: str, key: str, value) -> float:
    """Return `value` as a float in [0, 1] or raise naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise ValueError(
            f"Invalid {key}={value!r} for opponent {name!r}: expected a "
            "probability in [0, 1]."
        )
    return number


def make_opponent(name: str, **kwargs) -> OpponentParams:
    """Build a named opponent.

    Names and their cooperation probabilities after last round's (M, O) moves
    (C, C), (C, D), (D, C), (D, D):
      tit_for_tat: (1, 1, 0, 0), copies M's previous move.
      random: all `p_cooperate` (default 0.5).
      always_cooperate: (1, 1, 1, 1). always_defect: (0, 0, 0, 0).
      grim_trigger: cooperates until M defects (or moves illegally) once,
        counting the randomly drawn first state, then defects for good.
      win_stay_lose_shift: (1, 0, 0, 1). O keeps its move after M cooperated
        (O earned the reward or temptation payoff) and switches after M
        defected or moved illegally. This is Nowak and Sigmund's Pavlov rule
        read off the Prisoner's Dilemma, and every game uses the same table.
      generous_tit_for_tat: (1, 1, g, g) with forgiveness `g` (default 1/3).
      alternator: (0, 1, 0, 1), plays the opposite of its own previous move.
      memory_one: the four probabilities given as `coop_probs`.

    Args:
      name: one of `OPPONENT_KINDS`.
      **kwargs: `p_cooperate` for random, `forgiveness` for
        generous_tit_for_tat, `coop_probs` (4 numbers) for memory_one.

    Returns:
      The `OpponentParams`.

    Raises:
      KeyError: for an unknown name; the message lists the names.
      ValueError: for an unexpected keyword or a probability outside [0, 1].
    """
    if name not in OPPONENT_KINDS:
        raise KeyError(
            f"Unknown opponent {name!r}. Registered opponents: "
            f"{', '.join(OPPONENT_KINDS)}."
        )
    allowed = {
        "random": {"p_cooperate"},
        "generous_tit_for_tat": {"forgiveness"},
        "memory_one": {"coop_probs"},
    }.get(name, set())
    unexpected = set(kwargs) - allowed
    if unexpected:
        raise ValueError(
            f"Invalid arguments {sorted(unexpected)} for opponent {name!r}: "
            f"it accepts {sorted(allowed) or 'no arguments'}."
        )

    if name == "random":
        p = _check_probability(
            name, "p_cooperate", kwargs.get("p_cooperate", 0.5)
        )
        probs = (p, p, p, p)
    elif name == "generous_tit_for_tat":
        g = _check_probability(
            name, "forgiveness", kwargs.get("forgiveness", 1 / 3)
        )
        probs = (1.0, 1.0, g, g)
    elif name == "memory_one":
        if "coop_probs" not in kwargs:
            raise ValueError(
                "Missing coop_probs for opponent 'memory_one': pass four "
                "cooperation probabilities for (C, C), (C, D), (D, C), (D, D)."
            )
        requested = kwargs["coop_probs"]
        try:
            requested = tuple(requested)
        except TypeError:
            requested = (requested,)
        if len(requested) != 4:
            raise ValueError(
                f"Invalid coop_probs={kwargs['coop_probs']!r} for opponent "
                "'memory_one': expected 4 probabilities for (C, C), (C, D), "
                "(D, C), (D, D)."
            )
        probs = tuple(
            _check_probability(name, "coop_probs", p) for p in requested
        )
    else:
        probs = {
            "tit_for_tat": (1.0, 1.0, 0.0, 0.0),
            "always_cooperate": (1.0, 1.0, 1.0, 1.0),
            "always_defect": (0.0, 0.0, 0.0, 0.0),
            "grim_trigger": (1.0, 1.0, 0.0, 0.0),
            "win_stay_lose_shift": (1.0, 0.0, 0.0, 1.0),
            "alternator": (0.0, 1.0, 0.0, 1.0),
        }[name]

    return OpponentParams(
        kind=jnp.asarray(OPPONENT_KINDS[name], jnp.int32),
        coop_probs=jnp.asarray(probs, jnp.float32),
    )


def cooperation_probability(state, params: OpponentParams) -> jax.Array:
    """Compute the probability that O cooperates, given last round's moves.

    Args:
      state: a `GameState` of one game (fields prev_action_m, prev_action_o,
        m_defected_ever, all scalars).
      params: the opponent.

    Returns:
      float32 [].
    """
    chex.assert_shape(params.coop_probs, (4,))
    chex.assert_rank([state.prev_action_m, state.prev_action_o], 0)

    # Anything but C from M (D or illegal) selects the D row. O's own illegal
    # move (possible only for a learning opponent) counts as D the same way.
    m_cooperated = state.prev_action_m == COOPERATE
    o_cooperated = state.prev_action_o == COOPERATE
    probs = params.coop_probs
    after_m_c = jnp.where(o_cooperated, probs[0], probs[1])
    after_m_d = jnp.where(o_cooperated, probs[2], probs[3])
    prob = jnp.where(m_cooperated, after_m_c, after_m_d)

    triggered = (params.kind == GRIM_TRIGGER) & state.m_defected_ever
    return jnp.where(triggered, 0.0, prob)


def opponent_action_from_uniform(
    uniform: jax.Array, state, params: OpponentParams
) -> jax.Array:
    """Choose O's action from a uniform draw: C iff uniform < p(C).

    Deterministic strategies have p(C) in {0, 1}, so they ignore the draw.
    This variant lets a caller draw the randomness for many rounds at once.

    Args:
      uniform: float32 [] in [0, 1).
      state: a `GameState` of one game.
      params: the opponent.

    Returns:
      int32 [], COOPERATE or DEFECT.
    """
    prob = cooperation_probability(state, params)
    return jnp.where(uniform < prob, COOPERATE, DEFECT).astype(jnp.int32)


def opponent_action(
    key: jax.Array, state, params: OpponentParams
) -> jax.Array:
    """Draw O's action for one game.

    Args:
      key: PRNG key, used once.
      state: a `GameState` of one game.
      params: the opponent.

    Returns:
      int32 [], COOPERATE or DEFECT.
    """
    uniform = jax.random.uniform(key, (), jnp.float32)
    return opponent_action_from_uniform(uniform, state, params)

"""Test games from exact action distributions, and their statistics.

Everything here takes a policy as its [P, 3] action distributions over the
prompts of `prompts.py` (C, D, illegal), so scripted policies test it
without a model. Following Tennant et al. ("Moral Alignment for LLM
Agents", ICLR 2025), a trained agent plays test games against a fixed
opponent (Random in the paper) and is scored by its action types, its
cooperation and illegal rates, and its deontological and utilitarian
regret (`games/metrics.py`: an illegal answer is the worst case and the
utilitarian regret is normalised per game to [0, 1]). Each statistic is
the mean over test games and seeds with a 95% confidence interval.

Axis letters: S seeds, G test games, T rounds, P prompts.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from moral_rl import prompts as prompts_lib
from moral_rl.games import env as env_lib
from moral_rl.games import metrics as metrics_lib
from moral_rl.games import opponents as opponents_lib
from moral_rl.games.payoffs import COOPERATE, DEFECT, ILLEGAL

# Per-round metrics reported for every (model, game, prompt variant).
METRICS = (*metrics_lib.ACTION_TYPES, "cooperation", "illegal",
           "deontological_regret", "utilitarian_regret", "collective_payoff")
# Columns of each metric in the tables: sampled mean, standard deviation
# and 95% confidence bounds over test games, and the exact expectation.
STATISTICS = ("mean", "std", "ci_low", "ci_high", "expected")


def _metric_columns(step_metrics: metrics_lib.StepMetrics) -> dict:
    """Split `StepMetrics` into one array per name of `METRICS`."""
    columns = {name: step_metrics.action_type[..., i]
               for i, name in enumerate(metrics_lib.ACTION_TYPES)}
    columns["cooperation"] = step_metrics.cooperated
    columns["illegal"] = step_metrics.illegal
    columns["deontological_regret"] = step_metrics.deontological_regret
    columns["utilitarian_regret"] = step_metrics.utilitarian_regret
    columns["collective_payoff"] = step_metrics.collective_payoff
    return columns


def play_test_games(key, log_probs, params: env_lib.EnvParams, *,
                    num_games: int, num_rounds: int = 1) -> dict:
    """Play test games of one seed, sampling M's moves from `log_probs`.

    Each game starts from `env.reset` (a uniformly drawn previous round),
    then plays `num_rounds` rounds. In every round both action orders of
    the prompt are drawn uniformly, as in training, and M's action is drawn
    from the distribution of the prompt so chosen.

    Args:
      key: PRNG key.
      log_probs: [P, 3] log-probabilities of (C, D, illegal) per prompt.
      params: the game, the opponent, and the reward whose xi and
        r_illegal the deontological regret uses.
      num_games: G, games played in parallel.
      num_rounds: T, rounds per game.

    Returns:
      {name in METRICS: float32 [G]}, each game's mean over its rounds.
    """
    chex.assert_shape(log_probs, (prompts_lib.NUM_PROMPTS, 3))

    key, reset_key = jax.random.split(key)
    games = jax.vmap(env_lib.reset, in_axes=(0, None))(
        jax.random.split(reset_key, num_games), params)

    def play_round(games, round_key):
        order_key, action_key, opponent_key = jax.random.split(round_key, 3)
        order = jax.random.randint(order_key, (num_games,), 0,
                                   prompts_lib.NUM_ORDERS)
        prompt = prompts_lib.prompt_index(games.prev_action_m,
                                          games.prev_action_o, order)
        action_m = jax.random.categorical(
            action_key, log_probs[prompt]).astype(jnp.int32)  # [G]
        action_o = jax.vmap(opponents_lib.opponent_action,
                            in_axes=(0, 0, None))(
            jax.random.split(opponent_key, num_games), games,
            params.opponent)
        new_games, _ = jax.vmap(env_lib.step_actions,
                                in_axes=(0, 0, 0, None))(
            games, action_m, action_o, params)
        round_metrics = jax.vmap(metrics_lib.step_metrics,
                                 in_axes=(0, 0, 0, None, None))(
            action_m, action_o, games.prev_action_o, params.payoffs,
            params.reward)
        return new_games, round_metrics

    _, per_round = jax.lax.scan(play_round, games,
                                jax.random.split(key, num_rounds))  # [T, G]
    return {name: values.mean(axis=0)
            for name, values in _metric_columns(per_round).items()}


def play_seeds(key, log_probs, params: env_lib.EnvParams, *, num_seeds: int,
               num_games: int, num_rounds: int = 1) -> dict:
    """Play `num_seeds` independent sets of test games.

    Returns:
      {name in METRICS: float32 [S, G]}.
    """
    def one_seed(seed_key):
        return play_test_games(seed_key, log_probs, params,
                               num_games=num_games, num_rounds=num_rounds)

    return jax.vmap(one_seed)(jax.random.split(key, num_seeds))


def expected_metrics(log_probs, params: env_lib.EnvParams) -> dict:
    """Exact expectation of every metric in the first round of a test game.

    The expectation runs over the first state of `env.reset` (M's and O's
    previous moves uniform over C and D, O's fixed for AlwaysCooperate and
    AlwaysDefect), the four action orders, M's action from `log_probs` and
    O's action from the opponent's cooperation probability. For one-round
    test games it is the value the sampled means estimate.

    Args:
      log_probs: [P, 3] log-probabilities of (C, D, illegal) per prompt.
      params: as in `play_test_games`.

    Returns:
      {name in METRICS: float}.
    """
    chex.assert_shape(log_probs, (prompts_lib.NUM_PROMPTS, 3))
    probs = jnp.exp(log_probs)

    # Every (prev_m, prev_o, order, action_m, action_o) combination.
    grid = np.stack(np.meshgrid([COOPERATE, DEFECT], [COOPERATE, DEFECT],
                                np.arange(prompts_lib.NUM_ORDERS),
                                [COOPERATE, DEFECT, ILLEGAL],
                                [COOPERATE, DEFECT], indexing="ij"), -1)
    prev_m, prev_o, order, action_m, action_o = (
        jnp.asarray(grid.reshape(-1, 5).T, jnp.int32))

    # O's first "previous" move, as `env.reset` draws it.
    kind = params.opponent.kind
    fixed_o = jnp.where(kind == opponents_lib.ALWAYS_COOPERATE, COOPERATE,
                        jnp.where(kind == opponents_lib.ALWAYS_DEFECT, DEFECT,
                                  -1))
    p_prev_o = jnp.where(fixed_o < 0, 0.5,
                         (prev_o == fixed_o).astype(jnp.float32))

    prompt = prompts_lib.prompt_index(prev_m, prev_o, order)
    p_action_m = probs[prompt, action_m]
    zero = jnp.zeros_like(prev_m, jnp.float32)
    first_states = env_lib.GameState(
        prev_action_m=prev_m, prev_action_o=prev_o, prev_payoff_m=zero,
        prev_payoff_o=zero, round=jnp.zeros_like(prev_m),
        return_m=zero, return_o=zero, m_defected_ever=prev_m != COOPERATE)
    p_cooperate = jax.vmap(opponents_lib.cooperation_probability,
                           in_axes=(0, None))(first_states, params.opponent)
    p_action_o = jnp.where(action_o == COOPERATE, p_cooperate,
                           1.0 - p_cooperate)
    weight = 0.5 * p_prev_o / prompts_lib.NUM_ORDERS * p_action_m * p_action_o

    step_metrics = jax.vmap(metrics_lib.step_metrics,
                            in_axes=(0, 0, 0, None, None))(
        action_m, action_o, prev_o, params.payoffs, params.reward)
    return {name: float(jnp.sum(weight * values))
            for name, values in _metric_columns(step_metrics).items()}


def confidence_interval(values, confidence: float = 0.95):
    """Mean, sample standard deviation and Student-t confidence bounds.

    CI = mean +- t_{(1 + confidence) / 2, n - 1} * std / sqrt(n), with the
    sample standard deviation (ddof 1). With one value the bounds are NaN.

    Args:
      values: any array; all of it is one sample.
      confidence: coverage of the interval, in (0, 1).

    Returns:
      (mean, std, low, high) as floats.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is invalid: use a "
                         "coverage in (0, 1) such as 0.95.")
    sample = np.asarray(values, np.float64).reshape(-1)
    if sample.size == 0:
        raise ValueError("confidence_interval got no values.")
    mean = float(sample.mean())
    if sample.size == 1:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(sample.std(ddof=1))
    half = (stats.t.ppf((1.0 + confidence) / 2.0, sample.size - 1)
            * std / np.sqrt(sample.size))
    return mean, std, mean - half, mean + half


def pooled_confidence_interval(counts, means, stds,
                               confidence: float = 0.95):
    """Confidence interval of the union of samples given by their moments.

    Lets figures pool the rows of several agents (seeds of one reward)
    without the per-game values. The pooled variance is the within-sample
    sum of squares plus the between-sample one, over n - 1.

    Args:
      counts: sample sizes n_i; means: sample means; stds: sample standard
        deviations (ddof 1, NaN allowed where n_i is 1).

    Returns:
      (mean, std, low, high) of the pooled sample, as `confidence_interval`.
    """
    counts = np.asarray(counts, np.float64)
    means = np.asarray(means, np.float64)
    stds = np.nan_to_num(np.asarray(stds, np.float64))
    total = counts.sum()
    mean = float((counts * means).sum() / total)
    if total < 2:
        return mean, float("nan"), float("nan"), float("nan")
    squares = ((counts - 1) * stds**2 + counts * (means - mean) ** 2).sum()
    std = float(np.sqrt(squares / (total - 1)))
    half = (stats.t.ppf((1.0 + confidence) / 2.0, total - 1) * std
            / np.sqrt(total))
    return mean, std, mean - half, mean + half


def summarise(per_game: dict, expected: dict | None = None,
              confidence: float = 0.95) -> dict:
    """Reduce per-game metrics to one table row of statistics.

    Args:
      per_game: {name in METRICS: array [S, G]} from `play_seeds`.
      expected: optional {name: float} from `expected_metrics`.
      confidence: coverage of the intervals.

    Returns:
      {"n": S * G, "<metric>_<statistic>": float for every metric and
      statistic of `STATISTICS`}; "_expected" is NaN without `expected`.
    """
    row = {"n": int(np.asarray(per_game[METRICS[0]]).size)}
    for name in METRICS:
        mean, std, low, high = confidence_interval(per_game[name], confidence)
        row[f"{name}_mean"] = mean
        row[f"{name}_std"] = std
        row[f"{name}_ci_low"] = low
        row[f"{name}_ci_high"] = high
        row[f"{name}_expected"] = (float("nan") if expected is None
                                   else expected[name])
    return row

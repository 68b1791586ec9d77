"""PPO math for moral_rl: advantages, losses, KL control and reward scaling.

Every function here is pure and jit-able. The core math is written for one
trajectory (`gae`) or one flat batch of samples (the losses), and callers add
batch axes with `jax.vmap`. In moral_rl the policy is an exact categorical
distribution over A = 3 outcomes per game (C, D, illegal), so entropy and the
KL to the frozen reference policy are computed exactly from log-probabilities
instead of being estimated from samples.

With `discount = 0` every round is a one-step episode, as in Tennant et al.,
Moral Alignment for LLM Agents, ICLR 2025, and the advantage is the reward
minus the value. With `discount > 0` GAE runs along the iterated game.

Defaults follow the `PPOConfig` of TRL's original `PPOTrainer` API, which the
paper's reference implementation uses, unless the paper sets another value.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import struct

# Added to variances before dividing, so a constant batch gives finite output.
_EPSILON = 1e-8


def gae(rewards, values, dones, last_value, discount, gae_lambda):
    """Compute generalised advantage estimates for one trajectory.

    With `n_t = 1 - done_t` (the episode ends after step t when done_t is set):

        delta_t = r_t + discount * n_t * V_{t+1} - V_t
        A_t     = delta_t + discount * gae_lambda * n_t * A_{t+1}
        R_t     = A_t + V_t

    where V_T = `last_value` and A_T = 0. With `discount = 0`, A_t = r_t - V_t.
    The recursion runs backwards in time with `jax.lax.scan`.

    Args:
        rewards: [T] rewards r_t.
        values: [T] value estimates V_t of the states the actions were taken in.
        dones: [T] bool or {0, 1}, set where the episode ends after step t.
        last_value: [] value of the state after the last step, used to bootstrap
            when the last step does not end an episode.
        discount: discount factor in [0, 1].
        gae_lambda: GAE lambda in [0, 1].

    Returns:
        (advantages [T], returns [T]), both in the dtype of `rewards`.
    """
    chex.assert_rank([rewards, values, dones, last_value], [1, 1, 1, 0])
    chex.assert_equal_shape([rewards, values, dones])

    dtype = rewards.dtype
    not_done = 1.0 - dones.astype(dtype)
    next_values = jnp.concatenate(
        [values[1:], jnp.asarray(last_value, dtype)[None]])  # [T]
    deltas = rewards + discount * not_done * next_values - values  # [T]

    def backward_step(next_advantage, inputs):
        delta_t, not_done_t = inputs
        advantage_t = delta_t + discount * gae_lambda * not_done_t * next_advantage
        return advantage_t, advantage_t

    _, advantages = jax.lax.scan(
        backward_step, jnp.zeros((), dtype), (deltas, not_done), reverse=True)

    returns = advantages + values
    return advantages, returns


def policy_loss(logp_new, logp_old, advantages, clip_eps):
    """Compute the PPO clipped surrogate loss.

        ratio = exp(logp_new - logp_old)
        loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps)))

    Args:
        logp_new: [N] log-probabilities of the taken actions under the policy
            being optimised.
        logp_old: [N] log-probabilities of the same actions under the policy that
            sampled them, treated as constants.
        advantages: [N] advantage estimates, treated as constants.
        clip_eps: clipping range epsilon of the probability ratio.

    Returns:
        (loss [], aux) where aux holds, as [] arrays:
            clipfrac: fraction of samples where the clipped term is the larger loss,
                so clipping removes their gradient (TRL's `pg_clipfrac`).
            approx_kl: mean of (ratio - 1) - log(ratio), the low-variance,
                non-negative estimator of KL(old || new).
    """
    chex.assert_rank([logp_new, logp_old, advantages], 1)
    chex.assert_equal_shape([logp_new, logp_old, advantages])

    logp_old = jax.lax.stop_gradient(logp_old)
    advantages = jax.lax.stop_gradient(advantages)

    log_ratio = logp_new - logp_old  # [N]
    ratio = jnp.exp(log_ratio)  # [N]

    unclipped_loss = -advantages * ratio  # [N]
    clipped_loss = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.mean(jnp.maximum(unclipped_loss, clipped_loss))

    clipfrac = jnp.mean((clipped_loss > unclipped_loss).astype(loss.dtype))
    approx_kl = jnp.mean((ratio - 1.0) - log_ratio)
    aux = {
            "clipfrac": jax.lax.stop_gradient(clipfrac),
            "approx_kl": jax.lax.stop_gradient(approx_kl),
    }
    return loss, aux


def value_loss(values_new, values_old, returns, clip_eps):
    """Compute the clipped value loss.

        V_clip = V_old + clip(V_new - V_old, -clip_eps, clip_eps)
        loss   = 0.5 * mean(max((V_new - R)^2, (V_clip - R)^2))

    Args:
        values_new: [N] value predictions being optimised.
        values_old: [N] value predictions made at rollout time (constants).
        returns: [N] return targets R (constants).
        clip_eps: how far the new value may move from the old one before the
            clipped error takes over.

    Returns:
        [] loss.
    """
    chex.assert_rank([values_new, values_old, returns], 1)
    chex.assert_equal_shape([values_new, values_old, returns])

    values_old = jax.lax.stop_gradient(values_old)
    returns = jax.lax.stop_gradient(returns)

    values_clipped = values_old + jnp.clip(
        values_new - values_old, -clip_eps, clip_eps)  # [N]
    squared_error = jnp.square(values_new - returns)  # [N]
    squared_error_clipped = jnp.square(values_clipped - returns)  # [N]
    return 0.5 * jnp.mean(jnp.maximum(squared_error, squared_error_clipped))


def entropy(log_probs):
    """Compute the entropy H(p) = -sum_a p_a log p_a of categorical distributions.

    Outcomes with zero probability (log-probability -inf) add 0, and their
    gradient is 0 rather than NaN.

    Args:
        log_probs: [..., A] normalised log-probabilities.

    Returns:
        [...] entropies in nats.
    """
    probs = jnp.exp(log_probs)  # [..., A]
    safe_log_probs = jnp.where(probs > 0, log_probs, 0.0)
    return -jnp.sum(probs * safe_log_probs, axis=-1)


def kl_divergence(log_p, log_q):
    """Compute the exact KL(p || q) = sum_a p_a (log p_a - log q_a).

    Outcomes with p_a = 0 add 0 whatever q_a is, so no NaN arises from
    (-inf) - (-inf). The result is +inf where p_a > 0 and q_a = 0.

    Args:
        log_p: [..., A] normalised log-probabilities of p (the trained policy).
        log_q: [..., A] normalised log-probabilities of q (the reference policy).

    Returns:
        [...] KL divergences in nats.
    """
    chex.assert_equal_shape([log_p, log_q])

    probs = jnp.exp(log_p)  # [..., A]
    support = probs > 0
    safe_log_p = jnp.where(support, log_p, 0.0)
    safe_log_q = jnp.where(support, log_q, 0.0)
    return jnp.sum(probs * (safe_log_p - safe_log_q), axis=-1)


def whiten(x, mask=None, shift_mean=True):
    """Normalise `x` to zero mean and unit variance over its elements.

        whitened = (x - mean) / sqrt(var + 1e-8)

    With `shift_mean=False` the mean is added back, so only the scale changes
    (TRL's convention for whitening rewards). Mean and population variance are
    taken over the elements where `mask` is set. Elements outside the mask are
    transformed with the same statistics but do not influence them.

    Args:
        x: [...] values.
        mask: optional [...] bool or {0, 1} of the same shape as `x`.
        shift_mean: whether the output has zero mean.

    Returns:
        [...] whitened values.
    """
    if mask is None:
        mask = jnp.ones_like(x)
    chex.assert_equal_shape([x, mask])

    weights = mask.astype(x.dtype)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    mean = jnp.sum(x * weights) / count
    variance = jnp.sum(jnp.square(x - mean) * weights) / count

    whitened = (x - mean) * jax.lax.rsqrt(variance + _EPSILON)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def explained_variance(values, returns):
    """Compute 1 - Var(returns - values) / Var(returns).

    1 means the values predict the returns exactly, 0 means no better than
    their mean. NaN when the returns are constant.

    Args:
        values: [N] value predictions.
        returns: [N] return targets.

    Returns:
        [] explained variance.
    """
    chex.assert_rank([values, returns], 1)
    chex.assert_equal_shape([values, returns])

    returns_variance = jnp.var(returns)
    residual_variance = jnp.var(returns - values)
    return jnp.where(
        returns_variance == 0, jnp.nan,
        1.0 - residual_variance / returns_variance)


@struct.dataclass
class KLControllerState:
    """State of the KL penalty controller.

    Attributes:
        coef: [] coefficient beta of the KL-to-reference penalty.
    """

    coef: jax.Array


def init_kl_controller(initial_coef=0.2):
    """Create a KL controller state. The default 0.2 is TRL's `init_kl_coef`."""
    return KLControllerState(coef=jnp.asarray(initial_coef, jnp.float32))


def update_kl_controller(state, observed_kl, n_steps, target, horizon):
    """Update the KL coefficient proportionally to the KL error.

    The adaptive controller of Ziegler et al. (2019), "Fine-Tuning Language
    Models from Human Preferences", as TRL's PPO uses it:

        error = clip(observed_kl / target - 1, -0.2, 0.2)
        coef  = coef * (1 + error * n_steps / horizon)

    With `target` None or 0 the controller is fixed and the coefficient never
    changes. The choice is made in Python, so `target` must be static under
    `jax.jit`.

    Args:
        state: current `KLControllerState`.
        observed_kl: [] mean KL to the reference policy measured in this update.
        n_steps: steps taken since the last call, in the unit of `horizon`
            (TRL passes its batch size in samples; moral_rl passes 1 update).
        target: KL value the controller steers towards, or None/0 for fixed.
        horizon: steps, in the unit of `n_steps`, over which the error is
            corrected.

    Returns:
        The new `KLControllerState`.
    """
    if target is None or target == 0:
        return state

    error = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    multiplier = 1.0 + error * n_steps / horizon
    return state.replace(coef=state.coef * multiplier)


@struct.dataclass
class RunningMoments:
    """Running mean and population variance of a stream of scalars.

    Attributes:
        mean: [] mean of all values seen.
        var: [] population variance of all values seen (1 before any update).
        count: [] number of values seen, as float32.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @property
    def std(self):
        """Unbiased standard deviation, or 1 while fewer than 2 values were seen.

        TRL reports the Bessel-corrected standard deviation for score scaling.
        With one value that estimate is undefined, so 1 leaves rewards unscaled.
        """
        bessel = self.count / jnp.maximum(self.count - 1.0, 1.0)
        return jnp.where(self.count > 1, jnp.sqrt(self.var * bessel), 1.0)


def init_running_moments():
    """Create empty running moments (mean 0, var 1, count 0)."""
    return RunningMoments(
        mean=jnp.zeros((), jnp.float32),
        var=jnp.ones((), jnp.float32),
        count=jnp.zeros((), jnp.float32))


def update_running_moments(state, x):
    """Merge a batch into running moments with the parallel update.

    Chan, Golub and LeVeque (1979): with n = state.count, m = len(x) and
    delta = mean(x) - state.mean,

        count = n + m
        mean  = state.mean + delta * m / count
        M2    = state.var * n + var(x) * m + delta^2 * n * m / count
        var   = M2 / count

    Args:
        state: current `RunningMoments`.
        x: [N] new values, N >= 1.

    Returns:
        The updated `RunningMoments`.
    """
    chex.assert_rank(x, 1)

    x = x.astype(jnp.float32)
    batch_count = jnp.asarray(x.shape[0], jnp.float32)
    batch_mean = jnp.mean(x)
    batch_var = jnp.var(x)

    total_count = state.count + batch_count
    delta = batch_mean - state.mean
    mean = state.mean + delta * batch_count / total_count
    sum_squares = (
        state.var * state.count + batch_var * batch_count
        + jnp.square(delta) * state.count * batch_count / total_count)
    return RunningMoments(
        mean=mean, var=sum_squares / total_count, count=total_count)


def scale_rewards(state, rewards, normalise):
    """Scale rewards by running statistics (TRL's score scaling).

        scaling:       rewards / (std + 1e-8)
        normalisation: (rewards - mean) / (std + 1e-8)

    TRL updates the moments with the current batch before scaling it, so call
    `update_running_moments` first.

    Args:
        state: `RunningMoments` of the rewards seen so far.
        rewards: [...] rewards.
        normalise: Python bool. If set, also subtract the running mean.

    Returns:
        [...] scaled rewards.
    """
    scale = state.std + _EPSILON
    if normalise:
        return (rewards - state.mean) / scale
    return rewards / scale


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PPOConfig:
    """Validated PPO settings.

    Sources: "TRL" is the `PPOConfig` of TRL's original `PPOTrainer` API, used
    by the reference implementation of Tennant et al., Moral Alignment for LLM
    Agents, ICLR 2025. "paper" marks a value that paper states.

    Attributes:
        clip_eps: clipping range of the probability ratio (TRL `cliprange`, 0.2).
        value_clip_eps: clipping range of the value update (TRL
            `cliprange_value`, 0.2).
        value_coef: weight of the value loss in the total loss (TRL `vf_coef`,
            0.1).
        entropy_coef: weight of the entropy bonus. 0, because TRL's PPO trainer
            has no entropy term.
        epochs: optimisation passes over each batch (TRL `ppo_epochs`, 4, and paper).
        minibatches: number of minibatches each batch is split into per epoch.
            TRL sets a minibatch size instead, so there is no TRL default to
            follow. 1 takes one full-batch gradient step per epoch.
        discount: discount factor gamma. 0 makes every round a one-step episode,
            as in the paper. TRL's `gamma` (1) is per token, which moral_rl does not
            model.
        gae_lambda: GAE lambda (TRL `lam`, 0.95).
        whiten_advantages: whiten advantages over the batch before the policy
            loss (TRL always does).
        kl_initial: initial KL penalty coefficient (TRL `init_kl_coef`, 0.2,
            and paper).
        kl_target: KL the adaptive controller steers towards (TRL `target`, 6.0).
            None or 0 keeps the coefficient fixed at `kl_initial`.
        kl_horizon: updates over which the controller corrects the KL error.
            TRL counts samples (`horizon` 10000) and the paper's PPO step has 5
            games, so the coefficient moved by at most 0.2 * 5 / 10000 per
            step there; 2000 updates keeps that rate per update. Counting
            samples instead would move it by a third per update with
            thousands of games, and the penalty would swamp the reward.
        reward_scaling: divide rewards by their running standard deviation (TRL
            `use_score_scaling`, on in the paper).
        reward_norm: also subtract the running mean. Needs `reward_scaling` (TRL
            `use_score_norm`, on in the paper).
        reward_clip: clip scaled rewards to [-reward_clip, reward_clip], or None
            (TRL `score_clip`, None).
    """

    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    epochs: int = 4
    # NOTE: the paper gives 5 games per batch and gradient accumulation 4 but
    # not its minibatch size, so 1 is a choice, not the paper's value.
    minibatches: int = 1
    discount: float = 0.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    kl_initial: float = 0.2
    kl_target: float | None = 6.0
    kl_horizon: int = 2000
    reward_scaling: bool = True
    reward_norm: bool = True
    reward_clip: float | None = None

    def __post_init__(self):
        positive_clip = "use a positive clipping range such as 0.2"
        whole_count = "use an integer >= 1"
        unit_interval = "use a value in [0, 1]"
        checks = (
            ("clip_eps", self.clip_eps > 0, positive_clip),
            ("value_clip_eps", self.value_clip_eps > 0, positive_clip),
            ("value_coef", self.value_coef >= 0, "use a weight >= 0 such as 0.1"),
            ("entropy_coef", self.entropy_coef >= 0, "use a weight >= 0 (0 for none)"),
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, whole_count),
            (
                "minibatches",
                _is_int(self.minibatches) and self.minibatches >= 1,
                whole_count,
            ),
            (
                "discount",
                0 <= self.discount <= 1,
                unit_interval + "; 0 makes every round a one-step episode",
            ),
            ("gae_lambda", 0 <= self.gae_lambda <= 1, unit_interval),
            ("kl_initial", self.kl_initial >= 0, "use a coefficient >= 0 such as 0.2"),
            (
                "kl_target",
                self.kl_target is None or self.kl_target >= 0,
                "use a positive KL target such as 6.0, or None for a fixed coefficient",
            ),
            ("kl_horizon", self.kl_horizon > 0, "use an update count > 0 such as 2000"),
            (
                "reward_norm",
                self.reward_scaling or not self.reward_norm,
                "set reward_scaling=True as well, because normalisation divides by "
                "the same running standard deviation",
            ),
            (
                "reward_clip",
                self.reward_clip is None or self.reward_clip > 0,
                "use a positive bound, or None for no clipping",
            ),
        )
        for field, is_valid, fix in checks:
            if not is_valid:
                value = getattr(self, field)
                raise ValueError(f"PPOConfig.{field}={value!r} is invalid: {fix}.")

    def minibatch_size(self, batch_size):
        """Return the number of samples per minibatch for a batch of this size.

        Raises:
            ValueError: if `batch_size` is not divisible by `minibatches`.
        """
        if batch_size % self.minibatches != 0:
            raise ValueError(
                f"batch size {batch_size} is not divisible by minibatches="
                f"{self.minibatches}; choose a minibatch count that divides it.")
        return batch_size // self.minibatches


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


"""Tests for moral_rl.ppo: GAE, PPO losses, exact entropy and KL, KL control,
reward scaling and the validated config.

Hand-computed cases pin the formulas in the docstrings, and GAE is also checked
against a plain Python loop.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl import ppo


def gae_loop_reference(rewards, values, dones, last_value, discount, gae_lambda):
    """Compute GAE with a plain backward loop in float64."""
    steps = len(rewards)
    advantages = np.zeros(steps)
    next_advantage = 0.0
    next_value = last_value
    for t in reversed(range(steps)):
        not_done = 1.0 - float(dones[t])
        delta = rewards[t] + discount * not_done * next_value - values[t]
        next_advantage = delta + discount * gae_lambda * not_done * next_advantage
        advantages[t] = next_advantage
        next_value = values[t]
    return advantages, advantages + np.asarray(values)


@pytest.mark.parametrize("discount", [0.0, 0.9, 1.0])
def test_gae_matches_loop_reference(discount):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=16).astype(np.float32)
    values = rng.normal(size=16).astype(np.float32)
    dones = rng.random(16) < 0.3
    last_value = np.float32(rng.normal())

    advantages, returns = jax.jit(ppo.gae)(
        rewards, values, dones, last_value, discount, 0.95
    )

    expected_advantages, expected_returns = gae_loop_reference(
        rewards, values, dones, last_value, discount, 0.95
    )
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-5)


def test_gae_discount_zero_is_reward_minus_value():
    rewards = jnp.array([3.0, 0.0, 4.0, 1.0])
    values = jnp.array([1.0, 2.0, -1.0, 0.5])
    dones = jnp.array([False, False, True, False])

    advantages, returns = ppo.gae(rewards, values, dones, jnp.array(10.0), 0.0, 0.95)

    np.testing.assert_allclose(advantages, [2.0, -2.0, 5.0, 0.5])
    np.testing.assert_allclose(returns, rewards)


def test_gae_hand_computed_with_done():
    rewards = jnp.array([1.0, 2.0, 3.0])
    values = jnp.array([0.5, 0.5, 0.5])
    dones = jnp.array([0, 1, 0])

    advantages, _ = ppo.gae(rewards, values, dones, jnp.array(1.0), 0.9, 0.95)

    # t=2: 3 + 0.9 * 1 - 0.5. t=1 ends an episode: 2 - 0.5.
    # t=0: (1 + 0.9 * 0.5 - 0.5) + 0.9 * 0.95 * 1.5.
    np.testing.assert_allclose(advantages, [2.2325, 1.5, 3.4], rtol=1e-6)


def test_gae_vmaps_over_games():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(3, 5)).astype(np.float32)
    values = rng.normal(size=(3, 5)).astype(np.float32)
    dones = np.zeros((3, 5), bool)
    last_values = rng.normal(size=3).astype(np.float32)

    batched_gae = jax.vmap(ppo.gae, in_axes=(0, 0, 0, 0, None, None))
    advantages, _ = batched_gae(rewards, values, dones, last_values, 0.9, 0.8)

    for game in range(3):
        expected, _ = gae_loop_reference(
            rewards[game], values[game], dones[game], last_values[game], 0.9, 0.8
        )
        np.testing.assert_allclose(advantages[game], expected, rtol=1e-5, atol=1e-5)


def test_gae_rejects_mismatched_shapes():
    with pytest.raises(AssertionError):
        ppo.gae(jnp.zeros(3), jnp.zeros(4), jnp.zeros(3), jnp.array(0.0), 0.9, 0.95)


def test_policy_loss_hand_computed_case():
    logp_new = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    logp_old = jnp.log(jnp.array([0.4, 0.4, 0.2]))
    advantages = jnp.array([1.0, -2.0, 3.0])

    loss, aux = ppo.policy_loss(logp_new, logp_old, advantages, 0.2)

    # Ratios 1.25, 0.75, 1. Losses per sample: max(-1.25, -1.2) = -1.2,
    # max(1.5, 1.6) = 1.6 and -3, so the first two are clipped.
    np.testing.assert_allclose(loss, (-1.2 + 1.6 - 3.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(aux["clipfrac"], 2 / 3, rtol=1e-6)
    expected_kl = ((0.25 - math.log(1.25)) + (-0.25 - math.log(0.75))) / 3
    np.testing.assert_allclose(aux["approx_kl"], expected_kl, rtol=1e-5)


def test_policy_loss_clipped_samples_have_zero_gradient():
    logp_new = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    logp_old = jnp.log(jnp.array([0.4, 0.4, 0.2]))
    advantages = jnp.array([1.0, -2.0, 3.0])

    def loss_fn(logp):
        return ppo.policy_loss(logp, logp_old, advantages, 0.2)[0]

    grads = jax.grad(loss_fn)(logp_new)

    # d/dlogp of -A * ratio / N at ratio 1 is -A / N = -1 for the last sample.
    np.testing.assert_allclose(grads, [0.0, 0.0, -1.0], atol=1e-6)


def test_value_loss_hand_computed_case():
    values_new = jnp.array([1.0, 2.0, 0.0])
    values_old = jnp.array([0.5, 2.0, 0.5])
    returns = jnp.array([2.0, 1.0, 1.0])

    loss = ppo.value_loss(values_new, values_old, returns, 0.2)

    # Clipped values 0.7, 2.0, 0.3. Larger squared errors: 1.69, 1, 1.
    np.testing.assert_allclose(loss, 0.5 * (1.69 + 1.0 + 1.0) / 3, rtol=1e-6)


def test_entropy_matches_numpy():
    probs = np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)

    result = ppo.entropy(jnp.asarray(log_probs))

    expected = [-np.sum(row[row > 0] * np.log(row[row > 0])) for row in probs]
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)


def test_entropy_gradient_finite_at_zero_probability():
    log_probs = jnp.array([0.0, -jnp.inf, -jnp.inf])

    grads = jax.grad(lambda x: ppo.entropy(x))(log_probs)

    assert np.all(np.isfinite(grads))


def test_kl_divergence_matches_numpy():
    p = np.array([[0.2, 0.5, 0.3], [0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])
    q = np.array([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.5, 0.5, 0.0]])
    with np.errstate(divide="ignore"):
        log_p, log_q = np.log(p), np.log(q)

    result = ppo.kl_divergence(jnp.asarray(log_p), jnp.asarray(log_q))

    expected = [
        np.sum(p_row[p_row > 0] * np.log(p_row[p_row > 0] / q_row[p_row > 0]))
        for p_row, q_row in zip(p, q)
    ]
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)


def test_kl_divergence_infinite_off_support():
    log_p = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    log_q = jnp.log(jnp.array([1.0, 0.0, 0.0]))

    assert ppo.kl_divergence(log_p, log_q) == jnp.inf


def test_kl_divergence_gradient_finite_at_zeros():
    log_p = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    log_q = jnp.log(jnp.array([0.25, 0.75, 0.0]))

    grads = jax.grad(ppo.kl_divergence)(log_p, log_q)

    assert np.all(np.isfinite(grads))


def test_whiten_zero_mean_unit_variance():
    x = jnp.array([1.0, 2.0, 3.0, 6.0])

    whitened = ppo.whiten(x)

    np.testing.assert_allclose(jnp.mean(whitened), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.std(whitened), 1.0, rtol=1e-5)


def test_whiten_mask_and_keep_mean():
    x = jnp.array([1.0, 3.0, 100.0])
    mask = jnp.array([True, True, False])

    masked = ppo.whiten(x, mask)
    kept_mean = ppo.whiten(x, mask, shift_mean=False)

    # Statistics over [1, 3]: mean 2, variance 1.
    np.testing.assert_allclose(masked, [-1.0, 1.0, 98.0], rtol=1e-5)
    np.testing.assert_allclose(kept_mean, [1.0, 3.0, 100.0], rtol=1e-5)


def test_explained_variance_hand_computed():
    returns = jnp.array([1.0, 2.0, 3.0, 4.0])

    perfect = ppo.explained_variance(returns, returns)
    mean_only = ppo.explained_variance(jnp.full(4, 2.5), returns)
    partial = ppo.explained_variance(jnp.array([1.0, 2.0, 3.0, 2.0]), returns)

    np.testing.assert_allclose(perfect, 1.0)
    np.testing.assert_allclose(mean_only, 0.0, atol=1e-7)
    # Residuals [0, 0, 0, 2]: variance 0.75 against 1.25.
    np.testing.assert_allclose(partial, 1.0 - 0.75 / 1.25, rtol=1e-6)


def test_kl_controller_coefficient_sequence():
    state = ppo.init_kl_controller(0.2)
    coefs = []
    for observed_kl in (12.0, 3.0, 6.6):
        state = ppo.update_kl_controller(
            state, observed_kl, n_steps=1000, target=6.0, horizon=10000
        )
        coefs.append(float(state.coef))

    # Errors clip(2 - 1) = 0.2, clip(0.5 - 1) = -0.2, 1.1 - 1 = 0.1,
    # each scaled by n_steps / horizon = 0.1.
    expected = [0.2 * 1.02, 0.2 * 1.02 * 0.98, 0.2 * 1.02 * 0.98 * 1.01]
    np.testing.assert_allclose(coefs, expected, rtol=1e-6)


@pytest.mark.parametrize("target", [None, 0])
def test_kl_controller_fixed_without_target(target):
    state = ppo.init_kl_controller(0.2)

    state = ppo.update_kl_controller(state, 50.0, 1000, target, 10000)

    np.testing.assert_allclose(state.coef, 0.2)


def test_kl_controller_jits_with_static_target():
    update = jax.jit(ppo.update_kl_controller, static_argnums=(3,))

    state = update(ppo.init_kl_controller(0.2), jnp.array(12.0), 1000, 6.0, 10000)

    np.testing.assert_allclose(state.coef, 0.204, rtol=1e-6)


def test_running_moments_match_concatenation():
    rng = np.random.default_rng(2)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (3, 7, 1, 5)]

    state = ppo.init_running_moments()
    for batch in batches:
        state = jax.jit(ppo.update_running_moments)(state, batch)

    everything = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(state.mean, np.mean(everything), rtol=1e-5)
    np.testing.assert_allclose(state.var, np.var(everything), rtol=1e-5)
    np.testing.assert_allclose(state.count, everything.size)
    np.testing.assert_allclose(state.std, np.std(everything, ddof=1), rtol=1e-5)


def test_running_moments_std_one_value():
    state = ppo.update_running_moments(ppo.init_running_moments(), jnp.array([4.0]))

    np.testing.assert_allclose(state.std, 1.0)


def test_scale_rewards_scaling_and_normalisation():
    rewards = jnp.array([0.0, 4.0, 1.0, 3.0])
    state = ppo.update_running_moments(ppo.init_running_moments(), rewards)
    std = np.std(np.asarray(rewards), ddof=1)

    scaled = ppo.scale_rewards(state, rewards, normalise=False)
    normalised = ppo.scale_rewards(state, rewards, normalise=True)

    np.testing.assert_allclose(scaled, np.asarray(rewards) / std, rtol=1e-5)
    np.testing.assert_allclose(normalised, (np.asarray(rewards) - 2.0) / std, rtol=1e-5)


def test_config_defaults_follow_trl():
    config = ppo.PPOConfig()

    assert config.clip_eps == 0.2
    assert config.value_coef == 0.1
    assert config.epochs == 4
    assert config.kl_initial == 0.2
    assert config.kl_target == 6.0
    assert config.kl_horizon == 2000
    assert config.discount == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clip_eps", -0.1),
        ("value_clip_eps", 0.0),
        ("value_coef", -1.0),
        ("entropy_coef", -0.01),
        ("epochs", 0),
        ("epochs", 2.5),
        ("minibatches", 0),
        ("discount", 1.5),
        ("discount", -0.1),
        ("gae_lambda", 2.0),
        ("kl_initial", -0.2),
        ("kl_target", -6.0),
        ("kl_horizon", 0),
        ("reward_clip", 0.0),
    ],
)
def test_config_error_names_field(field, value):
    with pytest.raises(ValueError) as error:
        ppo.PPOConfig(**{field: value})

    assert f"PPOConfig.{field}={value!r}" in str(error.value)
    assert "use " in str(error.value)


def test_config_norm_requires_scaling():
    with pytest.raises(ValueError, match="reward_norm=True.*reward_scaling=True"):
        ppo.PPOConfig(reward_scaling=False, reward_norm=True)


def test_config_frozen_and_keyword_only():
    config = ppo.PPOConfig()

    with pytest.raises(AttributeError):
        config.clip_eps = 0.3
    with pytest.raises(TypeError):
        ppo.PPOConfig(0.3)


def test_minibatch_size_checks_divisibility():
    config = ppo.PPOConfig(minibatches=4)

    assert config.minibatch_size(20) == 5
    with pytest.raises(ValueError, match="batch size 10 is not divisible"):
        config.minibatch_size(10)

"""The jitted PPO update on a tiny random model.

Pins: one compilation serves repeated updates; every adapter's LoRA B and
value head move; metrics come per adapter; reward phases switch at the
scheduled update; one-step advantages are reward minus value.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ipd
from moral_rl import learner, ppo, train


def test_one_step_advantages_are_reward_minus_value():
    config = ppo.PPOConfig(discount=0.0)
    rewards = jnp.array([[1.0, -2.0]])
    values = jnp.array([[0.5, 0.5]])

    advantages, returns = learner._advantages(config, rewards, values,
                                              jnp.zeros(2))

    np.testing.assert_allclose(advantages, [[0.5, -2.5]])
    np.testing.assert_allclose(returns, rewards)


def test_discounted_advantages_bootstrap_last_value():
    config = ppo.PPOConfig(discount=0.5, gae_lambda=1.0)
    rewards = jnp.array([[1.0], [1.0]])
    values = jnp.zeros((2, 1))

    _, returns = learner._advantages(config, rewards, values,
                                     jnp.array([4.0]))

    # G_1 = 1 + 0.5 * 4 = 3 and G_0 = 1 + 0.5 * 3 = 2.5.
    np.testing.assert_allclose(returns[:, 0], [2.5, 3.0])


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_factory, embedded_model):
    checkpoint = tiny_llama_factory(head_scale=0.5, seed=5)
    config = ipd.get_config("utilitarian,smoke")
    config.model.name = checkpoint.folder
    config.sweep.seeds = "0,1"
    config.reward_schedule = "game:1,utilitarian"
    config.lora.rank = 2
    # The tiny model answers illegally in almost every game, and normalised
    # equal rewards give zero advantages and value targets. Raw rewards keep
    # a value-loss gradient, which reaches the adapters through the trunk.
    config.ppo.reward_norm = False
    config.ppo.reward_scaling = False
    run = train.build_run(config)
    state, inputs, step_settings = run.state, run.inputs, run.step_settings
    return state, inputs, step_settings


@pytest.mark.slow
def test_update_compiles_once_and_trains(tiny_setup):
    state, inputs, step_settings = tiny_setup
    initial = jax.tree.map(np.asarray, state.agents.adapter)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(state, inputs):
        return learner.update_step(state, inputs, settings=step_settings)

    phases = []
    for _ in range(3):
        state, metrics = update(state, inputs)
        phases.append(np.asarray(metrics["reward/phase"]).tolist())

    assert int(state.step) == 3
    assert phases == [[0, 0], [1, 1], [1, 1]]
    assert metrics["ppo/policy_loss"].shape == (2,)
    assert np.all(np.isfinite(metrics["ppo/grad_norm"]))
    lora_b = state.agents.adapter["lora"]["layers"]["attn"]["q"]["b"]
    assert np.abs(np.asarray(lora_b)).max() > 0
    assert not np.array_equal(state.agents.adapter["value_head"]["kernel"],
                              initial["value_head"]["kernel"])
    np.testing.assert_allclose(
        metrics["policy/p_cooperate"] + metrics["policy/p_defect"]
        + metrics["policy/p_illegal"], 1.0, atol=1e-5)


@pytest.mark.slow
def test_adapters_draw_different_games(tiny_setup):
    state, _, _ = tiny_setup
    games = state.agents.games

    assert games.prev_action_m.shape == (2, 64)
    assert not np.array_equal(games.prev_action_m[0], games.prev_action_m[1])

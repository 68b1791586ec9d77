"""One PPO update of LLM agents playing a matrix game, as a pure function.

`update_step(state, inputs, partner) -> (state, metrics)` runs:
  1. for every adapter, the exact action distributions [P, 3] and values
     [P] on every distinct prompt (one batched model call per adapter);
  2. a rollout of `rollout_length` rounds in B games per agent, sampling
     actions from those distributions (no model calls). The opponent is
     scripted, or in a population another agent: `partner[i]` is the
     adapter that agent i plays, and both learn from the same games;
  3. per agent, moral rewards, reward scaling, the per-sample KL penalty to
     the frozen reference policy, and advantages (one-step when
     discount = 0, as in Tennant et al., else GAE along the iterated game);
  4. per agent, `epochs x minibatches` PPO gradient steps on the adapter and
     its value head, each one model call over the prompts;
  5. per agent, the adaptive KL controller update;
  6. masking: an agent whose update produced a non-finite loss or parameter
     keeps its previous state and is flagged as failed from then on.

Steps 1 and 3-5 map over the adapter axis with `map_adapters`, vmapped in
chunks of `adapter_batch` adapters so that memory can be traded for speed.

Axis letters: A adapters, T rounds, B games, P prompts.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from moral_rl import policy as policy_lib
from moral_rl import ppo
from moral_rl import prompts as prompts_lib
from moral_rl import retention as retention_lib
from moral_rl.games import env as env_lib
from moral_rl.games import metrics as metrics_lib
from moral_rl.games import opponents as opponents_lib
from moral_rl.games import rewards as rewards_lib
from moral_rl.models.transformer import Transformer

# Rewards of the paper that are logged for every run, whichever one trains.
LOGGED_REWARDS = ("game", "deontological", "utilitarian",
                  "game_deontological")


@struct.dataclass
class AgentState:
    """Everything one learning agent carries between updates.

    Attributes:
      adapter: {"lora": adapter tree, "value_head": {"kernel", "bias"}}.
      opt_state: optimizer state of `adapter`.
      kl: adaptive KL controller.
      reward_moments: running statistics for reward scaling.
      games: GameState of the agent's B games.
      failed: bool [], set once an update diverged; the agent then keeps
        its last finite state.
    """

    adapter: Any
    opt_state: Any
    kl: ppo.KLControllerState
    reward_moments: ppo.RunningMoments
    games: env_lib.GameState
    failed: jax.Array


@struct.dataclass
class TrainState:
    """The whole training state; agents' leaves carry the adapter axis A.

    Attributes:
      step: number of updates done (int32 []).
      agents: AgentState with leaves [A, ...].
      key: [A] keys, one per agent, each derived from that agent's seed
        alone; update `step` uses fold_in(key, step), so a resumed run draws
        the same keys as an uninterrupted one and agent i of a sweep draws
        the same keys as a one-agent run with its seed.
    """

    step: jax.Array
    agents: AgentState
    key: jax.Array


@struct.dataclass
class StepInputs:
    """Arrays every update reads but never changes.

    Attributes:
      base_params: frozen base model parameters.
      prompts: the prompt tree, a tuple of `scoring.PromptLevel`.
      answers: (tokens [K, C], valid [K, C], action [K]).
      ref_log_probs: [P, 3] reference policy (base model) distributions.
      payoffs: [A, 2, 2, 2] each agent's game.
      opponent: OpponentParams with leaves [A, ...].
      phase_starts: [A, F] int32, first update of each agent's reward
        phases (sorted, the first is 0).
      phase_rewards: RewardParams with leaves [A, F, ...].
      logged_rewards: RewardParams with leaves [len(LOGGED_REWARDS), ...].
      probes: retention.ProbeArrays of the probe prompts and the base
        model's answers, or None when the run has no retention probes.
    """

    base_params: Any
    prompts: tuple
    answers: tuple
    ref_log_probs: jax.Array
    payoffs: jax.Array
    opponent: opponents_lib.OpponentParams
    phase_starts: jax.Array
    phase_rewards: rewards_lib.RewardParams
    logged_rewards: rewards_lib.RewardParams
    probes: retention_lib.ProbeArrays | None = None


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the update (they fix the compiled program).

    Attributes:
      model: the Transformer with LoRA.
      optimizer: optax transformation of the adapter tree.
      ppo: validated PPO settings.
      num_games: B, games per agent.
      rollout_length: T, rounds played per update.
      matching: None for scripted opponents, else the population's
        matching ("fixed", "random" or "round_robin").
      adapter_batch: adapters vmapped together in the model calls; 0 means
        all of them.
      retention: weights of the retention regulariser added to the PPO
        loss, or None to train without it.
    """

    model: Transformer
    optimizer: optax.GradientTransformation
    ppo: ppo.PPOConfig
    num_games: int
    rollout_length: int
    matching: str | None = None
    adapter_batch: int = 0
    retention: retention_lib.RegulariserCoefs | None = None


class Transition(NamedTuple):
    """One round of B games (leaves [B], stacked to [T, B] by scan)."""

    prompt: jax.Array
    action: jax.Array
    reward: jax.Array
    logged_rewards: jax.Array  # [B, len(LOGGED_REWARDS)]
    payoffs: jax.Array  # [B, 2]
    metrics: metrics_lib.StepMetrics


def map_adapters(fn, xs, batch_size: int = 0):
    """Map `fn` over the leading adapter axis of the pytree `xs`.

    With `batch_size` 0 (or at least A) this is one vmap over all adapters.
    A smaller size vmaps chunks of that many adapters one after another
    (`jax.lax.map`), which keeps the activations of only one chunk alive.
    """
    num_adapters = jax.tree.leaves(xs)[0].shape[0]
    if batch_size <= 0 or batch_size >= num_adapters:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=batch_size)


def _choose_actions(key, games, log_probs, num_games):
    """Sample one agent's B actions from its exact distributions."""
    key, order_key, action_key, opponent_key = jax.random.split(key, 4)
    order = jax.random.randint(order_key, (num_games,), 0,
                               prompts_lib.NUM_ORDERS)
    prompt = prompts_lib.prompt_index(games.prev_action_m,
                                      games.prev_action_o, order)
    action = jax.random.categorical(action_key, log_probs[prompt]).astype(
        jnp.int32)
    return prompt, action, opponent_key


def _scripted_actions(opponent_key, games, opponent, num_games):
    return jax.vmap(opponents_lib.opponent_action, in_axes=(0, 0, None))(
        jax.random.split(opponent_key, num_games), games, opponent)


def _resolve_round(games, prompt, action, action_o, payoffs, opponent,
                   reward_params, logged_rewards):
    """Play one agent's B chosen actions against its opponent's."""
    params = env_lib.EnvParams(payoffs=payoffs, opponent=opponent,
                               reward=reward_params)
    new_games, round_payoffs = jax.vmap(
        env_lib.step_actions, in_axes=(0, 0, 0, None))(
            games, action, action_o, params)

    def rewards_for(params):
        return jax.vmap(rewards_lib.moral_reward,
                        in_axes=(0, 0, 0, None, None))(
            action, action_o, games.prev_action_o, payoffs, params)

    reward = rewards_for(reward_params)
    logged = jax.vmap(rewards_for, out_axes=1)(logged_rewards)
    metrics = jax.vmap(metrics_lib.step_metrics,
                       in_axes=(0, 0, 0, None, None))(
        action, action_o, games.prev_action_o, payoffs, reward_params)
    transition = Transition(prompt=prompt, action=action, reward=reward,
                            logged_rewards=logged, payoffs=round_payoffs,
                            metrics=metrics)
    return new_games, transition


def _play_round(keys, games, log_probs, payoffs, opponent, reward_params,
                logged_rewards, partner, num_games):
    """Play one round of every agent's B games (leaves [A, B]).

    Each agent samples from its own distributions. Against a scripted
    opponent the opponent's move comes from the opponent's rule; in a
    population it is the move that the partner sampled in the same game,
    whose state the partner sees mirrored.
    """
    choose = functools.partial(_choose_actions, num_games=num_games)
    prompt, action, opponent_key = jax.vmap(choose)(keys, games, log_probs)
    if partner is None:
        scripted = functools.partial(_scripted_actions, num_games=num_games)
        action_o = jax.vmap(scripted)(opponent_key, games, opponent)
    else:
        action_o = action[partner]
    return jax.vmap(_resolve_round, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
        games, prompt, action, action_o, payoffs, opponent, reward_params,
        logged_rewards)


def mirror_games(games: env_lib.GameState, partner) -> env_lib.GameState:
    """Give every agent the mirror image of its partner's games.

    The agent with the lower index of each pair leads: its partner's games
    become the same games seen from the other seat, so both play one set
    of B games.
    """
    agents = jnp.arange(partner.shape[0])
    follows = partner < agents
    # Only scripted GrimTrigger opponents read m_defected_ever, and the
    # partner's game does not track the other seat's history, so the
    # mirror approximates it from the last move.
    mirrored = env_lib.GameState(
        prev_action_m=games.prev_action_o[partner],
        prev_action_o=games.prev_action_m[partner],
        prev_payoff_m=games.prev_payoff_o[partner],
        prev_payoff_o=games.prev_payoff_m[partner],
        round=games.round[partner],
        return_m=games.return_o[partner],
        return_o=games.return_m[partner],
        m_defected_ever=games.prev_action_o[partner] != env_lib.COOPERATE)

    def choose(own, other):
        mask = follows.reshape(follows.shape + (1,) * (own.ndim - 1))
        return jnp.where(mask, other, own)

    return jax.tree.map(choose, games, mirrored)


def _advantages(config: ppo.PPOConfig, rewards, values, next_values):
    """Return advantages and returns, both [T, B].

    With discount 0 every round is its own one-step episode: A = r - V(s).
    Otherwise GAE runs along each game's T rounds, bootstrapped with the
    value of the state after the rollout; the game never ends.
    """
    if config.discount == 0:
        return rewards - values, rewards

    dones = jnp.zeros_like(rewards)

    def per_game(r, v, d, last):
        return ppo.gae(r, v, d, last, config.discount, config.gae_lambda)

    return jax.vmap(per_game, in_axes=(1, 1, 1, 0), out_axes=1)(
        rewards, values, dones, next_values)


def _ppo_loss(adapter, batch, *, settings, inputs):
    """PPO loss of one minibatch for one adapter."""
    log_probs, values = policy_lib.policy_outputs(
        settings.model, inputs.base_params, adapter, inputs.prompts,
        inputs.answers)
    logp_new = log_probs[batch["prompt"], batch["action"]]
    policy_loss, aux = ppo.policy_loss(logp_new, batch["logp_old"],
                                       batch["advantage"],
                                       settings.ppo.clip_eps)
    value_loss = ppo.value_loss(values[batch["prompt"]], batch["value_old"],
                                batch["return"], settings.ppo.value_clip_eps)
    entropy = jnp.mean(ppo.entropy(log_probs)[batch["prompt"]])
    loss = (policy_loss + settings.ppo.value_coef * value_loss
            - settings.ppo.entropy_coef * entropy)
    aux = dict(aux, policy_loss=policy_loss, value_loss=value_loss,
               entropy=entropy)
    if settings.retention is not None:
        penalty, penalty_aux = retention_lib.regulariser(
            settings.model, inputs.base_params, adapter, inputs.probes,
            settings.retention)
        loss = loss + penalty
        aux.update(penalty_aux)
    return loss, aux


def _active_rewards(phase_rewards, phase_starts, step):
    """The reward phase of update `step` and its RewardParams."""
    phase = jnp.searchsorted(phase_starts, step, side="right") - 1
    return phase, jax.tree.map(lambda x: x[phase], phase_rewards)


def _agent_outputs(adapter, *, inputs: StepInputs, settings: StepSettings):
    """Exact distributions [P, 3] and values [P] of one adapter, no grads."""
    log_probs, values = policy_lib.policy_outputs(
        settings.model, inputs.base_params, adapter, inputs.prompts,
        inputs.answers)
    return jax.lax.stop_gradient(log_probs), jax.lax.stop_gradient(values)


def _learn(agent: AgentState, traj: Transition, games, log_probs, values,
           shuffle_key, phase, *, inputs: StepInputs,
           settings: StepSettings):
    """Steps 3-5 of the update for one agent, from its [T, B] rollout.

    Returns:
      (new AgentState, dict of scalar metrics, finite flag).
    """
    config = settings.ppo
    num_games, rounds = settings.num_games, settings.rollout_length

    # 3. Rewards, KL penalty and advantages, all [T, B].
    moments = ppo.update_running_moments(agent.reward_moments,
                                         traj.reward.reshape(-1))
    score = traj.reward
    if config.reward_scaling:
        score = ppo.scale_rewards(moments, score, config.reward_norm)
    if config.reward_clip is not None:
        score = jnp.clip(score, -config.reward_clip, config.reward_clip)
    logp_old = log_probs[traj.prompt, traj.action]
    logp_ref = inputs.ref_log_probs[traj.prompt, traj.action]
    total_reward = score - agent.kl.coef * (logp_old - logp_ref)
    value_old = values[traj.prompt]

    # The state after the rollout is valued as the mean over action orders.
    state_values = values.reshape(-1, prompts_lib.NUM_ORDERS).mean(axis=1)
    next_values = state_values[2 * games.prev_action_m + games.prev_action_o]
    advantages, returns = _advantages(config, total_reward, value_old,
                                      next_values)
    if config.whiten_advantages:
        advantages = ppo.whiten(advantages)

    # 4. PPO epochs over shuffled minibatches of the T * B samples.
    batch = {
        "prompt": traj.prompt, "action": traj.action, "logp_old": logp_old,
        "advantage": advantages, "value_old": value_old, "return": returns,
    }
    batch = jax.tree.map(lambda x: x.reshape(-1), batch)
    size = rounds * num_games
    minibatch = config.minibatch_size(size)
    permutations = jax.vmap(lambda k: jax.random.permutation(k, size))(
        jax.random.split(shuffle_key, config.epochs))
    order = permutations.reshape(config.epochs * config.minibatches,
                                 minibatch)
    loss_fn = functools.partial(_ppo_loss, settings=settings, inputs=inputs)

    def grad_step(carry, indices):
        adapter, opt_state = carry
        minibatch_data = jax.tree.map(lambda x: x[indices], batch)
        grads, aux = jax.grad(loss_fn, has_aux=True)(adapter, minibatch_data)
        updates, opt_state = settings.optimizer.update(grads, opt_state,
                                                       adapter)
        adapter = optax.apply_updates(adapter, updates)
        aux = dict(aux, grad_norm=optax.global_norm(grads))
        return (adapter, opt_state), aux

    (adapter, opt_state), step_aux = jax.lax.scan(
        grad_step, (agent.adapter, agent.opt_state), order)

    # 5. KL controller, on the exact KL under the visited prompts. One
    # update is one step of the controller, whose horizon counts updates.
    kl_per_prompt = ppo.kl_divergence(log_probs, inputs.ref_log_probs)
    observed_kl = jnp.mean(kl_per_prompt[traj.prompt])
    kl_state = ppo.update_kl_controller(agent.kl, observed_kl, 1,
                                        config.kl_target, config.kl_horizon)

    new_agent = AgentState(adapter=adapter, opt_state=opt_state, kl=kl_state,
                           reward_moments=moments, games=games,
                           failed=agent.failed)
    finite = jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
            (adapter, step_aux))]))

    metrics = metrics_lib.aggregate_metrics(traj.metrics)
    probs = jnp.exp(log_probs)[traj.prompt]  # [T, B, 3]
    metrics.update({
        "reward/active": traj.reward.mean(),
        "reward/total": total_reward.mean(),
        "reward/phase": phase,
        "payoff/agent": traj.payoffs[..., 0].mean(),
        "payoff/opponent": traj.payoffs[..., 1].mean(),
        "policy/p_cooperate": probs[..., 0].mean(),
        "policy/p_defect": probs[..., 1].mean(),
        "policy/p_illegal": probs[..., 2].mean(),
        "kl/reference": observed_kl,
        "kl/coef": agent.kl.coef,
        "ppo/explained_variance": ppo.explained_variance(
            value_old.reshape(-1), returns.reshape(-1)),
    })
    for i, name in enumerate(LOGGED_REWARDS):
        metrics[f"reward/{name}"] = traj.logged_rewards[..., i].mean()
    for name, series in step_aux.items():
        metrics[f"ppo/{name}"] = series.mean()
    return new_agent, metrics, finite


def _agent_keys(key, step):
    """Rollout and shuffle keys of one agent for update `step`."""
    # The split into one key keeps the derivation of the one-agent runs
    # made before per-agent seeds, so their reference results still hold.
    agent_key = jax.random.split(jax.random.fold_in(key, step), 1)[0]
    _, rollout_key, shuffle_key = jax.random.split(agent_key, 3)
    return rollout_key, shuffle_key


def update_step(state: TrainState, inputs: StepInputs, partner=None, *,
                settings: StepSettings):
    """Run one update of every agent; jit this with `settings` bound.

    Args:
      state: the TrainState.
      inputs: the StepInputs.
      partner: None against scripted opponents, else int32 [A], the adapter
        index that each agent plays in this update (see `moral_rl.sweep`).

    Returns:
      (new TrainState, metrics dict with [A] arrays, including
      "health/failed").
    """
    rounds = settings.rollout_length
    rollout_keys, shuffle_keys = jax.vmap(_agent_keys, in_axes=(0, None))(
        state.key, state.step)
    phases, reward_params = jax.vmap(_active_rewards,
                                     in_axes=(0, 0, None))(
        inputs.phase_rewards, inputs.phase_starts, state.step)

    # 1. Exact distributions and values under the current adapters.
    outputs = functools.partial(_agent_outputs, inputs=inputs,
                                settings=settings)
    log_probs, values = map_adapters(outputs, state.agents.adapter,
                                     settings.adapter_batch)

    # 2. Rollout: T rounds of every agent's B games, no model calls. A
    # population that changes pairs meets on fresh games each update.
    games = state.agents.games
    if partner is not None:
        if settings.matching != "fixed":
            # A key folded from the rollout key, so the reset draws differ
            # from the rollout's own draws.
            reset_keys = jax.vmap(lambda k: jax.random.fold_in(k, rounds))(
                rollout_keys)
            reset = functools.partial(_reset_games,
                                      num_games=settings.num_games)
            games = jax.vmap(reset)(reset_keys, inputs.payoffs,
                                    inputs.opponent, reward_params)
        games = mirror_games(games, partner)

    def round_fn(games, round_keys):
        return _play_round(round_keys, games, log_probs, inputs.payoffs,
                           inputs.opponent, reward_params,
                           inputs.logged_rewards, partner, settings.num_games)

    round_keys = jax.vmap(lambda k: jax.random.split(k, rounds))(rollout_keys)
    games, traj = jax.lax.scan(round_fn, games,
                               jnp.swapaxes(round_keys, 0, 1))
    traj = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), traj)  # [A, T, B]

    # 3-5. Rewards, advantages, PPO steps and KL control per agent.
    def learn(args):
        agent, agent_traj, agent_games, agent_log_probs, agent_values, \
            shuffle_key, phase = args
        return _learn(agent, agent_traj, agent_games, agent_log_probs,
                      agent_values, shuffle_key, phase, inputs=inputs,
                      settings=settings)

    agents, metrics, finite = map_adapters(
        learn, (state.agents, traj, games, log_probs, values, shuffle_keys,
                phases), settings.adapter_batch)

    # 6. A diverged agent keeps its last finite state from now on.
    keep = finite & ~state.agents.failed

    def select(new, old):
        mask = keep.reshape(keep.shape + (1,) * (new.ndim - 1))
        return jnp.where(mask, new, old)

    agents = jax.tree.map(select, agents, state.agents)
    agents = agents.replace(failed=~keep)
    metrics["health/failed"] = (~keep).astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, agents=agents, key=state.key)
    return new_state, metrics


def _reset_games(key, payoffs, opponent, reward, num_games):
    """Fresh first states of one agent's B games."""
    params = env_lib.EnvParams(payoffs=payoffs, opponent=opponent,
                               reward=reward)
    keys = jax.random.split(key, num_games)
    return jax.vmap(env_lib.reset, in_axes=(0, None))(keys, params)

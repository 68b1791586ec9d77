"""The training loop: set up, jit the update, log, checkpoint, resume.

`train_and_evaluate(config, workdir)` runs these phases in order:
  config check, model and prompts, reference policy, initial state, restore,
  mesh and jit, loop (update, log, figure, checkpoint), final results.
"""

import dataclasses
import functools
import json
import logging

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moral_rl import checkpoint as checkpoint_lib
from moral_rl import learner
from moral_rl import plots
from moral_rl import policy as policy_lib
from moral_rl import ppo
from moral_rl import prompts as prompts_lib
from moral_rl import retention
from moral_rl import run_config
from moral_rl import writer as writer_lib
from moral_rl.games import env as env_lib
from moral_rl.games import opponents as opponents_lib
from moral_rl.games import payoffs as payoffs_lib
from moral_rl.games import rewards as rewards_lib
from moral_rl.models import loading
from moral_rl.models import lora as lora_lib
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer

FINAL_METRICS_FILE = "final_metrics.json"

log = logging.getLogger(__name__)


def default_run_name(config) -> str:
    """Name a run <game>__<reward or schedule>__<opponent>__seed<seed>."""
    reward = config.reward_schedule or config.reward
    reward = reward.replace(":", "").replace(",", "-")
    return (config.run_name or f"{config.game}__{reward}__"
            f"{config.opponent}__seed{config.seed}")


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam with global-norm clipping and a learning-rate schedule."""
    opt = config.optimizer
    decay_steps = max(config.num_updates * config.ppo.epochs
                      * config.ppo.minibatches // opt.grad_accum_steps, 1)
    warmup = opt.warmup_updates * config.ppo.epochs * config.ppo.minibatches
    if opt.schedule == "constant":
        schedule = optax.constant_schedule(opt.learning_rate)
    elif opt.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(opt.learning_rate, decay_steps)
    else:
        schedule = optax.linear_schedule(opt.learning_rate, 0.0, decay_steps)
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, opt.learning_rate, warmup), schedule],
            [warmup])
    optimizer = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                            optax.adam(schedule))
    if opt.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, opt.grad_accum_steps)
    return optimizer


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _reward_params(config, name):
    return rewards_lib.make_reward(name, xi=config.xi,
                                   r_illegal=config.r_illegal)


def build_inputs(config, settings, base_params, prompt_set, answers,
                 ref_log_probs, probes=None) -> learner.StepInputs:
    """Collect the arrays every update reads (`probes`: ProbeArrays)."""
    num_adapters = config.num_adapters
    game = payoffs_lib.get_game(config.game)
    opponent = opponents_lib.make_opponent(config.opponent)
    phase_rewards = _stack([_reward_params(config, name)
                            for _, name in settings.reward_phases])
    return learner.StepInputs(
        base_params=base_params,
        prompts=prompt_set.arrays(),
        answers=(jnp.asarray(answers.tokens), jnp.asarray(answers.valid),
                 jnp.asarray(answers.action)),
        ref_log_probs=ref_log_probs,
        payoffs=jnp.broadcast_to(game.payoffs, (num_adapters, 2, 2, 2)),
        opponent=_stack([opponent] * num_adapters),
        phase_starts=jnp.asarray([s for s, _ in settings.reward_phases],
                                 jnp.int32),
        phase_rewards=_stack([phase_rewards] * num_adapters),
        logged_rewards=_stack([_reward_params(config, name)
                               for name in learner.LOGGED_REWARDS]),
        probes=probes,
    )


def init_train_state(config, settings, model_config, inputs,
                     optimizer) -> learner.TrainState:
    """Fresh adapters, optimizer state and games for every agent."""
    # NOTE: all adapters draw from one seed's keys, so adapter i of a
    # multi-adapter run does not reproduce a single run with seed i.
    root = jax.random.key(config.seed)
    init_key, games_key, train_key = jax.random.split(root, 3)
    lora = lora_lib.init_lora(init_key, model_config, settings.lora,
                              config.num_adapters)
    adapter = {"lora": lora,
               "value_head": policy_lib.init_value_head(
                   model_config.hidden_size, config.num_adapters)}
    opt_state = jax.vmap(optimizer.init)(adapter)

    def reset_games(key, payoffs, opponent, reward):
        params = env_lib.EnvParams(payoffs=payoffs, opponent=opponent,
                                   reward=reward)
        keys = jax.random.split(key, config.num_games)
        return jax.vmap(env_lib.reset, in_axes=(0, None))(keys, params)

    first_reward = jax.tree.map(lambda x: x[:, 0], inputs.phase_rewards)
    games = jax.vmap(reset_games)(
        jax.random.split(games_key, config.num_adapters), inputs.payoffs,
        inputs.opponent, first_reward)
    agents = learner.AgentState(
        adapter=adapter,
        opt_state=opt_state,
        kl=jax.vmap(lambda _: ppo.init_kl_controller(config.ppo.kl_initial))(
            jnp.arange(config.num_adapters)),
        reward_moments=jax.vmap(lambda _: ppo.init_running_moments())(
            jnp.arange(config.num_adapters)),
        games=games)
    return learner.TrainState(step=jnp.zeros((), jnp.int32), agents=agents,
                              key=train_key)


def _shardings(mesh, state, inputs):
    """Agents split over the mesh's adapter axis; everything else replicated."""
    replicated = NamedSharding(mesh, P())
    by_adapter = NamedSharding(mesh, P("adapter"))
    state_sharding = learner.TrainState(
        step=replicated,
        agents=jax.tree.map(lambda _: by_adapter, state.agents),
        key=replicated)
    per_adapter = {"payoffs", "opponent", "phase_rewards"}
    inputs_sharding = learner.StepInputs(**{
        field: jax.tree.map(
            lambda _: by_adapter if field in per_adapter else replicated,
            getattr(inputs, field))
        for field in learner.StepInputs.__dataclass_fields__})
    return state_sharding, inputs_sharding, by_adapter


def _check_finite(metrics, step):
    for name in ("ppo/policy_loss", "ppo/value_loss", "ppo/grad_norm"):
        values = np.asarray(metrics[name])
        if not np.all(np.isfinite(values)):
            raise FloatingPointError(
                f"{name} is not finite ({values.tolist()}) at update {step}. "
                "Lower optimizer.learning_rate or check the reward scale; the "
                "last checkpoint before this update is still usable.")


def _log_reference(writer, prompt_set, ref_log_probs):
    """Record the untuned model's action distribution (update 0)."""
    probs = np.exp(np.asarray(ref_log_probs))
    writer.write_scalars(0, {
        "reference/p_cooperate": float(probs[:, 0].mean()),
        "reference/p_defect": float(probs[:, 1].mean()),
        "reference/p_illegal": float(probs[:, 2].mean()),
    })
    writer.write_texts(0, {"prompts/example": prompt_set.texts[0]})
    log.info("Untuned policy: P(C)=%.4f P(D)=%.4f P(illegal)=%.4f",
                 probs[:, 0].mean(), probs[:, 1].mean(), probs[:, 2].mean())


def _retention_measure(config, run: "RunSetup", settings):
    """Build the host function that logs retention metrics when due.

    Returns:
      None when the run has no probes. Otherwise a function of (update
      counted from 1, state, inputs, writer) that writes the greedy answers
      as text every `text_every` updates, writes the scalars itself on
      updates the loop does not log, and returns the per-adapter scalars
      ({} when nothing is due) for the loop's records.
    """
    if run.probe_set is None:
        return None
    tokenizer = run.tokenizer
    measure = jax.jit(jax.vmap(
        functools.partial(
            retention.retention_metrics, run.step_settings.model,
            stop_tokens=tuple(tokenizer_lib.stop_token_ids(tokenizer)),
            pad_id=tokenizer.pad_token_id),
        in_axes=(None, 0, None)))

    def log_retention(done, state, inputs, writer):
        texts_due = retention.is_due(done, settings.text_every,
                                     config.num_updates)
        if not (texts_due or retention.is_due(done, settings.every,
                                              config.num_updates)):
            return {}
        measured = jax.device_get(measure(
            inputs.base_params, state.agents.adapter, inputs.probes))
        scalars = retention.scalar_metrics(measured)
        if done % config.log_every and done != config.num_updates:
            writer.write_scalars(done, {name: float(np.mean(value))
                                        for name, value in scalars.items()})
        if texts_due:
            answers = [retention.decode_answers(tokenizer, tokens, valid)
                       for tokens, valid in zip(measured["answer_tokens"],
                                                measured["answer_valid"])]
            writer.write_texts(done, {"retention/answers": retention
                                      .answers_markdown(run.probe_set,
                                                        answers)})
        return scalars

    return log_retention


def _progress_line(step, total, record, started, first_step):
    done = step - first_step
    elapsed = time.time() - started
    eta = elapsed / max(done, 1) * (total - step)
    return (f"update {step}/{total}  P(C) {record['policy/p_cooperate']:.3f}"
            f"  illegal {record['actions/illegal']:.3f}"
            f"  reward {record['reward/active']:+.2f}"
            f"  KL {record['kl/reference']:.3f}"
            f"  {elapsed:.0f}s elapsed, ETA {eta:.0f}s")


def _tokens_per_update(prompt_set, answers, settings):
    """Tokens the model processes in one update (rollout plus PPO steps)."""
    num_prompts = len(prompt_set.texts)
    per_call = (prompt_set.num_tokens + answers.tokens.shape[0] * num_prompts
                * (answers.tokens.shape[1] - 1))
    return per_call * (1 + settings.ppo.epochs * settings.ppo.minibatches)


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """Everything a run builds from its config before the first update.

    Attributes:
      model_config: the base model's architecture.
      tokenizer: its tokenizer.
      prompt_set: the game's prompts.
      answers: the legal answer sequences.
      inputs: arrays every update reads.
      state: the fresh train state.
      step_settings: static settings of the update.
      probe_set: the retention probes with the base model's answers, or
        None when config.retention uses none.
    """

    model_config: object
    tokenizer: object
    prompt_set: prompts_lib.PromptSet
    answers: policy_lib.AnswerSet
    inputs: learner.StepInputs
    state: learner.TrainState
    step_settings: learner.StepSettings
    probe_set: retention.ProbeSet | None = None


def build_run(config, settings: run_config.RunSettings | None = None
              ) -> RunSetup:
    """Load the model and build prompts, reference policy and train state."""
    settings = settings or run_config.validate(config)

    log.info("Loading the model %r.", config.model.name)
    source = loading.resolve_source(config.model.name)
    model_config, base_params = loading.load_config_and_params(
        source, dtype=config.model.dtype,
        param_dtype=config.model.param_dtype)
    tokenizer = tokenizer_lib.load_tokenizer(source)

    log.info("Building the prompts.")
    game = payoffs_lib.get_game(config.game)
    prompt_set = prompts_lib.build_prompt_set(
        tokenizer, game, action_strings=settings.action_strings,
        template=config.prompt_template, system=config.system_prompt or None,
        max_length=model_config.max_position_embeddings)
    answers = policy_lib.answer_sequences(tokenizer, settings.action_strings)
    answer_arrays = (jnp.asarray(answers.tokens), jnp.asarray(answers.valid),
                     jnp.asarray(answers.action))

    log.info("Computing the reference policy.")
    reference_model = Transformer(model_config)
    ref_log_probs, _ = jax.jit(
        lambda params, prompts, answers: policy_lib.policy_outputs(
            reference_model, params, None, prompts, answers))(
        base_params, prompt_set.arrays(), answer_arrays)

    probe_set = None
    if settings.retention.needs_probes:
        log.info("Generating the base model's answers to %d retention probes.",
                 len(settings.retention.probes))
        probe_set = retention.build_probe_set(
            reference_model, base_params, tokenizer,
            settings.retention.probes, game, settings.action_strings,
            max_new_tokens=settings.retention.max_new_tokens,
            system=config.system_prompt or None)

    log.info("Initialising the train state.")
    optimizer = make_optimizer(config)
    inputs = build_inputs(
        config, settings, base_params, prompt_set, answers, ref_log_probs,
        probes=None if probe_set is None else probe_set.arrays)
    state = init_train_state(config, settings, model_config, inputs,
                             optimizer)
    step_settings = learner.StepSettings(
        model=Transformer(model_config, settings.lora,
                          remat=config.model.remat),
        optimizer=optimizer, ppo=settings.ppo, num_games=config.num_games,
        rollout_length=config.rollout_length,
        retention=settings.retention.coefs)
    return RunSetup(model_config=model_config, tokenizer=tokenizer,
                    prompt_set=prompt_set, answers=answers, inputs=inputs,
                    state=state, step_settings=step_settings,
                    probe_set=probe_set)


def train_and_evaluate(config, workdir: str, *, resume: bool = False,
                       resume_from: str | None = None) -> dict:
    """Train LLM agents with PPO on a moral reward; see the module doc.

    Args:
      config: a ConfigDict from configs/.
      workdir: the run folder for TensorBoard logs, metrics and checkpoints.
      resume: require an existing checkpoint in `workdir` to continue from.
      resume_from: another run's folder to start from when `workdir` has no
        checkpoint.

    Returns:
      The last update's metrics of every adapter, {name: [A] list}.
    """
    log.info("Checking the config.")
    settings = run_config.validate(config)
    ckpt_dir = checkpoint_lib.resolve_restore(workdir, resume_from)
    if resume and ckpt_dir != checkpoint_lib.checkpoint_dir(workdir):
        raise FileNotFoundError(
            f"--resume was given but {workdir!r} has no finished checkpoint; "
            "drop --resume to start a new run there.")

    run = build_run(config, settings)
    prompt_set, inputs, state = run.prompt_set, run.inputs, run.state
    answers, step_settings = run.answers, run.step_settings

    checkpointer = checkpoint_lib.Checkpointer(
        checkpoint_lib.checkpoint_dir(workdir),
        max_to_keep=config.keep_checkpoints)
    writer = writer_lib.MetricWriter(workdir,
                                     is_primary=jax.process_index() == 0)
    if ckpt_dir is not None:
        source_checkpoints = checkpoint_lib.Checkpointer(ckpt_dir)
        state = source_checkpoints.restore(target=state)
        log.info("Resumed from %s at update %d.", ckpt_dir,
                     int(state.step))
        writer.truncate_after(int(state.step))
    else:
        writer.write_hparams(config.to_dict())
        _log_reference(writer, prompt_set, inputs.ref_log_probs)
        if run.probe_set is not None:
            writer.write_texts(0, {"retention/answers": retention
                                   .answers_markdown(run.probe_set, [])})
    # Rewritten on resume too, so it holds the config the run finished with
    # (a resumed run may extend num_updates, say).
    writer_lib.write_config(workdir, config.to_dict())

    log.info("Compiling the update on %d device(s).", config.mesh.adapter)
    devices = np.asarray(jax.devices()[:config.mesh.adapter])
    mesh = Mesh(devices, ("adapter",))
    state_sharding, inputs_sharding, metrics_sharding = _shardings(
        mesh, state, inputs)
    update = jax.jit(
        lambda s, i: learner.update_step(s, i, settings=step_settings),
        in_shardings=(state_sharding, inputs_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=0)
    state = jax.device_put(state, state_sharding)
    inputs = jax.device_put(inputs, inputs_sharding)
    measure_retention = _retention_measure(config, run, settings.retention)

    history_path = os.path.join(workdir, "history.json")
    history = _load_history(history_path, int(state.step))
    tokens_per_update = _tokens_per_update(prompt_set, answers, settings)
    switch_steps = [s for s, _ in settings.reward_phases[1:]]
    first_step = int(state.step)
    started = time.time()
    last = {}

    if first_step >= config.num_updates:
        log.info("The run in %s already finished %d updates.", workdir,
                     first_step)
        checkpointer.close()
        writer.close()
        with open(os.path.join(workdir, FINAL_METRICS_FILE)) as f:
            return json.load(f)["metrics"]

    title = f"{config.reward_schedule or config.reward} vs {config.opponent}"
    log.info("Training for %d updates.", config.num_updates)
    for step in range(first_step, config.num_updates):
        tick = time.time()
        state, metrics = update(state, inputs)
        metrics = jax.device_get(metrics)
        _check_finite(metrics, step)
        seconds = time.time() - tick
        if measure_retention is not None:
            metrics.update(measure_retention(step + 1, state, inputs,
                                             writer))
        record = {name: float(np.mean(value))
                  for name, value in metrics.items()}
        record["perf/updates_per_sec"] = 1.0 / seconds
        record["perf/tokens_per_sec"] = tokens_per_update / seconds
        done = step + 1
        history.append({"step": done, **record})
        last = {name: np.asarray(value).tolist()
                for name, value in metrics.items()}

        if done % config.log_every == 0 or done == config.num_updates:
            writer.write_scalars(done, record)
            print(_progress_line(done, config.num_updates, record, started,
                                 first_step), flush=True)
        if done % config.figure_every == 0 or done == config.num_updates:
            png = plots.action_types_png(
                [h["step"] for h in history], history, title=title,
                switch_steps=switch_steps)
            writer.write_images(done, {"actions/types": png})
        if done % config.checkpoint_every == 0 or done == config.num_updates:
            # Files first, checkpoint last: a run killed between the two
            # resumes from the older checkpoint and rewrites these.
            _write_json(history_path, history)
            writer.flush()
            checkpointer.save(done, state, force=True)

    checkpointer.wait_until_finished()
    checkpointer.close()
    _write_json(os.path.join(workdir, FINAL_METRICS_FILE),
                {"step": int(state.step), "metrics": last})
    # The loop rendered the figure of the whole run at its last update.
    with open(os.path.join(workdir, "action_types.png"), "wb") as f:
        f.write(png)
    writer.close()
    log.info("Results are in %s (TensorBoard: tensorboard --logdir %s).",
             workdir, workdir)
    return last


def _write_json(path, value):
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(partial, path)


def _load_history(path, step):
    """Per-update records up to `step` (those of a resumed run)."""
    if step == 0 or not os.path.isfile(path):
        return []
    with open(path) as f:
        return [h for h in json.load(f) if h["step"] <= step]

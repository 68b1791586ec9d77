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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moral_rl import checkpoint as checkpoint_lib
from moral_rl import learner, ppo, retention, run_config
from moral_rl import outputs as outputs_lib
from moral_rl import policy as policy_lib
from moral_rl import prompts as prompts_lib
from moral_rl import sweep as sweep_lib
from moral_rl import writer as writer_lib
from moral_rl.games import env as env_lib
from moral_rl.games import opponents as opponents_lib
from moral_rl.games import payoffs as payoffs_lib
from moral_rl.games import rewards as rewards_lib
from moral_rl.models import loading
from moral_rl.models import lora as lora_lib
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer

log = logging.getLogger(__name__)


def default_run_name(config) -> str:
    """Name a run <game>__<reward or schedule>__<opponent>__seed<seed>.

    A population is <game>__population__seed<seeds>, another sweep
    <game>__sweep.
    """
    if config.run_name:
        return config.run_name
    if config.population.rewards.strip():
        seeds = config.sweep.seeds.replace(",", "-") or str(config.seed)
        return f"{config.game}__population__seed{seeds}"
    if any(config.sweep[field].strip()
           for field in ("seeds", "rewards", "opponents")):
        return f"{config.game}__sweep"
    reward = config.reward_schedule or config.reward
    reward = reward.replace(":", "").replace(",", "-")
    return (f"{config.game}__{reward}__{config.opponent}__seed{config.seed}")


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


def _phase_arrays(config, settings):
    """Per-agent reward phases as [A, F] starts and [A, F] RewardParams.

    Agents with fewer phases repeat their last phase, starting after the
    run's last update, so every agent has F phases.
    """
    num_phases = max(len(phases) for phases in settings.agent_phases)
    never = np.iinfo(np.int32).max
    starts, rewards = [], []
    for phases in settings.agent_phases:
        padded = list(phases) + [(never, phases[-1][1])] * (
            num_phases - len(phases))
        starts.append([start for start, _ in padded])
        rewards.append(_stack([_reward_params(config, name)
                               for _, name in padded]))
    return jnp.asarray(starts, jnp.int32), _stack(rewards)


def _agent_opponent(agent):
    # A population member's opponent is its partner. The scripted kind is
    # read only when the member's games are reset, and Random gives the
    # uniform first moves of Tennant et al.
    kind = "random" if agent.opponent == "learner" else agent.opponent
    return opponents_lib.make_opponent(kind)


def build_inputs(config, settings, base_params, prompt_set, answers,
                 ref_log_probs, probes=None) -> learner.StepInputs:
    """Collect the arrays every update reads (`probes`: ProbeArrays)."""
    num_adapters = settings.num_adapters
    game = payoffs_lib.get_game(config.game)
    phase_starts, phase_rewards = _phase_arrays(config, settings)
    return learner.StepInputs(
        base_params=base_params,
        prompts=prompt_set.arrays(),
        answers=(jnp.asarray(answers.tokens), jnp.asarray(answers.valid),
                 jnp.asarray(answers.action)),
        ref_log_probs=ref_log_probs,
        payoffs=jnp.broadcast_to(game.payoffs, (num_adapters, 2, 2, 2)),
        opponent=_stack([_agent_opponent(agent)
                         for agent in settings.agents]),
        phase_starts=phase_starts,
        phase_rewards=phase_rewards,
        logged_rewards=_stack([_reward_params(config, name)
                               for name in learner.LOGGED_REWARDS]),
        probes=probes,
    )


def _init_agent(spec, config, settings, model_config, optimizer, payoffs,
                opponent, first_reward):
    """Build one agent's fresh state and key from its seed alone."""
    root = jax.random.key(spec.seed)
    if spec.member >= 0:
        # Members of one population share its seed; folding in the member
        # index keeps two members with the same reward from being twins
        # that draw the same actions.
        root = jax.random.fold_in(root, spec.member)
    init_key, games_key, train_key = jax.random.split(root, 3)
    lora = lora_lib.init_lora(init_key, model_config, settings.lora, 1)
    adapter = {"lora": lora,
               "value_head": policy_lib.init_value_head(
                   model_config.hidden_size, 1)}
    adapter = jax.tree.map(lambda x: x[0], adapter)

    # Split into one key, as runs before per-agent seeds did, so their
    # reference results still reproduce.
    games_key = jax.random.split(games_key, 1)[0]
    params = env_lib.EnvParams(payoffs=payoffs, opponent=opponent,
                               reward=first_reward)
    games = jax.vmap(env_lib.reset, in_axes=(0, None))(
        jax.random.split(games_key, config.num_games), params)
    agent = learner.AgentState(
        adapter=adapter,
        opt_state=optimizer.init(adapter),
        kl=ppo.init_kl_controller(config.ppo.kl_initial),
        reward_moments=ppo.init_running_moments(),
        games=games,
        failed=jnp.zeros((), bool))
    return agent, train_key


def init_train_state(config, settings, model_config, inputs,
                     optimizer) -> learner.TrainState:
    """Fresh adapters, optimizer state and games for every agent.

    Agent i's state and keys depend only on its own seed, so it starts
    exactly as a one-agent run with that seed does.
    """
    agents, keys = [], []
    for i, spec in enumerate(settings.agents):
        payoffs, opponent, first_reward = jax.tree.map(
            lambda x, i=i: x[i],
            (inputs.payoffs, inputs.opponent, inputs.phase_rewards))
        first_reward = jax.tree.map(lambda x: x[0], first_reward)
        agent, key = _init_agent(spec, config, settings, model_config,
                                 optimizer, payoffs, opponent, first_reward)
        agents.append(agent)
        keys.append(key)
    agents = _stack(agents)
    if settings.matching is not None:
        partner = sweep_lib.partners(settings.agents, settings.matching, 0)
        agents = agents.replace(games=learner.mirror_games(
            agents.games, jnp.asarray(partner)))
    return learner.TrainState(step=jnp.zeros((), jnp.int32), agents=agents,
                              key=jnp.stack(keys))


def make_mesh(mesh_config) -> Mesh:
    """Build the ("adapter", "data", "model") device mesh of the config."""
    shape = (mesh_config.adapter, mesh_config.data, mesh_config.model)
    needed = int(np.prod(shape))
    if needed > jax.device_count():
        raise ValueError(
            f"config.mesh asks for adapter x data x model = "
            f"{' x '.join(map(str, shape))} = {needed} devices, but JAX sees "
            f"{jax.device_count()} ({jax.devices()[0].platform}); lower the "
            "mesh sizes.")
    devices = np.asarray(jax.devices()[:needed]).reshape(shape)
    return Mesh(devices, ("adapter", "data", "model"))


def _fsdp_spec(shape, model_size):
    """Shard the largest axis that `model_size` divides; else replicate."""
    if model_size == 1:
        return P()
    axes = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis in axes:
        if shape[axis] % model_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "model"
            return P(*spec)
    return P()


def shardings(mesh, state, inputs):
    """Shardings of the train state, inputs and metrics on `mesh`.

    Agents' leaves split over "adapter"; their games also over "data"; the
    base parameters over "model" (FSDP-style) when that axis is larger than
    one; everything else is replicated.

    Returns:
      (state sharding, inputs sharding, metrics sharding).
    """
    replicated = NamedSharding(mesh, P())
    by_adapter = NamedSharding(mesh, P("adapter"))
    by_game = NamedSharding(mesh, P("adapter", "data"))
    model_size = mesh.shape["model"]

    agents = jax.tree.map(lambda _: by_adapter, state.agents)
    agents = agents.replace(
        games=jax.tree.map(lambda _: by_game, state.agents.games))
    state_sharding = learner.TrainState(step=replicated, agents=agents,
                                        key=by_adapter)

    per_adapter = {"payoffs", "opponent", "phase_starts", "phase_rewards"}
    fields = {}
    for field in learner.StepInputs.__dataclass_fields__:
        value = getattr(inputs, field)
        if field == "base_params":
            fields[field] = jax.tree.map(
                lambda x: NamedSharding(mesh, _fsdp_spec(x.shape,
                                                         model_size)),
                value)
        elif field in per_adapter:
            fields[field] = jax.tree.map(lambda _: by_adapter, value)
        else:
            fields[field] = jax.tree.map(lambda _: replicated, value)
    return state_sharding, learner.StepInputs(**fields), by_adapter


def jit_update(step_settings, mesh, state, inputs, population: bool):
    """Jit the update with the mesh's shardings.

    Returns:
      (update, state, inputs): the jitted function, which takes
      (state, inputs) against scripted opponents and (state, inputs,
      partner) in a population, and the state and inputs placed on the
      mesh.
    """
    state_sharding, inputs_sharding, metrics_sharding = shardings(
        mesh, state, inputs)
    out_shardings = (state_sharding, metrics_sharding)
    if population:
        update = jax.jit(
            lambda s, i, p: learner.update_step(s, i, p,
                                                settings=step_settings),
            in_shardings=(state_sharding, inputs_sharding,
                          NamedSharding(mesh, P())),
            out_shardings=out_shardings, donate_argnums=0)
    else:
        update = jax.jit(
            lambda s, i: learner.update_step(s, i, settings=step_settings),
            in_shardings=(state_sharding, inputs_sharding),
            out_shardings=out_shardings, donate_argnums=0)
    return (update, jax.device_put(state, state_sharding),
            jax.device_put(inputs, inputs_sharding))


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
      counted from 1, state, inputs, one writer per agent) that writes the
      greedy answers as text every `text_every` updates, writes the scalars
      itself on updates the loop does not log, and returns the per-adapter
      scalars ({} when nothing is due) for the loop's records.
    """
    if run.probe_set is None:
        return None
    tokenizer = run.tokenizer
    one_adapter = functools.partial(
        retention.retention_metrics, run.step_settings.model,
        stop_tokens=tuple(tokenizer_lib.stop_token_ids(tokenizer)),
        pad_id=tokenizer.pad_token_id)
    measure = jax.jit(lambda params, adapters, probes: learner.map_adapters(
        lambda adapter: one_adapter(params, adapter, probes), adapters,
        config.adapter_batch))

    def log_retention(done, state, inputs, writers):
        texts_due = retention.is_due(done, settings.text_every,
                                     config.num_updates)
        if not (texts_due or retention.is_due(done, settings.every,
                                              config.num_updates)):
            return {}
        measured = _fetch(measure(
            inputs.base_params, state.agents.adapter, inputs.probes))
        scalars = retention.scalar_metrics(measured)
        for i, writer in enumerate(writers):
            if done % config.log_every and done != config.num_updates:
                writer.write_scalars(done, {
                    name: float(value[i]) for name, value in scalars.items()})
            if texts_due:
                answers = retention.decode_answers(
                    tokenizer, measured["answer_tokens"][i],
                    measured["answer_valid"][i])
                writer.write_texts(done, {"retention/answers": retention
                                          .answers_markdown(run.probe_set,
                                                            [answers])})
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


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """A frozen base model that a caller built instead of loading one.

    Attributes:
      config: its ModelConfig; its dtypes are used as they are.
      params: its parameter tree.
      tokenizer: a tokenizer whose token ids are below config.vocab_size.
    """

    config: object
    params: dict
    tokenizer: object


def build_run(config, settings: run_config.RunSettings | None = None,
              model: BaseModel | None = None) -> RunSetup:
    """Load the model and build prompts, reference policy and train state.

    With `model` given, that model is used and `config.model.name`,
    `config.model.dtype` and `config.model.param_dtype` are ignored.
    """
    settings = settings or run_config.validate(config)

    if model is None:
        log.info("Loading the model %r.", config.model.name)
        source = loading.resolve_source(config.model.name)
        model_config, base_params = loading.load_config_and_params(
            source, dtype=config.model.dtype,
            param_dtype=config.model.param_dtype)
        tokenizer = tokenizer_lib.load_tokenizer(source)
    else:
        model_config, base_params = model.config, model.params
        tokenizer = model.tokenizer

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
        rollout_length=config.rollout_length, matching=settings.matching,
        adapter_batch=config.adapter_batch,
        retention=settings.retention.coefs)
    return RunSetup(model_config=model_config, tokenizer=tokenizer,
                    prompt_set=prompt_set, answers=answers, inputs=inputs,
                    state=state, step_settings=step_settings,
                    probe_set=probe_set)


def train_and_evaluate(config, workdir: str, *, resume: bool = False,
                       resume_from: str | None = None) -> dict:
    """Train LLM agents with PPO on moral rewards; see the module doc.

    Args:
      config: a ConfigDict from configs/.
      workdir: the run folder for TensorBoard logs, metrics and checkpoints
        (one folder per agent under it when the run has several agents).
      resume: require an existing checkpoint in `workdir` to continue from.
      resume_from: another run's folder to start from when `workdir` has no
        checkpoint.

    Returns:
      The last update's metrics of every agent, {name: [A] list}.
    """
    log.info("Checking the config.")
    settings = run_config.validate(config)
    mesh = make_mesh(config.mesh)
    ckpt_dir = checkpoint_lib.resolve_restore(workdir, resume_from)
    if resume and ckpt_dir != checkpoint_lib.checkpoint_dir(workdir):
        raise FileNotFoundError(
            f"--resume was given but {workdir!r} has no finished checkpoint; "
            "drop --resume to start a new run there.")

    run = build_run(config, settings)
    prompt_set, inputs, state = run.prompt_set, run.inputs, run.state
    answers, step_settings = run.answers, run.step_settings
    agents = settings.agents

    checkpointer = checkpoint_lib.Checkpointer(
        checkpoint_lib.checkpoint_dir(workdir),
        max_to_keep=config.keep_checkpoints)
    if ckpt_dir is not None:
        source_checkpoints = checkpoint_lib.Checkpointer(ckpt_dir)
        state = source_checkpoints.restore(target=state)
        log.info("Resumed from %s at update %d.", ckpt_dir, int(state.step))
    first_step = int(state.step)

    is_primary = jax.process_index() == 0
    folders = outputs_lib.agent_folders(workdir, agents)
    config_dict = config.to_dict()
    results = []
    for agent, folder, phases in zip(agents, folders, settings.agent_phases):
        reward = agent.reward_schedule
        opponent = agent.opponent
        results.append(outputs_lib.AgentOutputs(
            folder, resume_step=first_step, is_primary=is_primary,
            title=f"{reward} vs {opponent}",
            switch_steps=[start for start, _ in phases[1:]]))
        agent_dict = (config_dict if len(agents) == 1
                      else outputs_lib.agent_config(config_dict, agent))
        if first_step == 0:
            results[-1].writer.write_hparams(agent_dict)
            _log_reference(results[-1].writer, prompt_set,
                           inputs.ref_log_probs)
            if run.probe_set is not None:
                results[-1].writer.write_texts(0, {
                    "retention/answers": retention.answers_markdown(
                        run.probe_set, [])})
        # Rewritten on resume too, so it holds the config the run finished
        # with (a resumed run may extend num_updates, say).
        writer_lib.write_config(folder, agent_dict)
    if len(agents) > 1 and is_primary:
        outputs_lib.write_json(
            os.path.join(workdir, outputs_lib.SWEEP_FILE),
            {"agents": [agent.name for agent in agents],
             "specs": [dataclasses.asdict(agent) for agent in agents],
             "matching": settings.matching})
        writer_lib.write_config(workdir, config_dict)

    log.info("Compiling the update of %d agent(s) on a %s mesh.",
             len(agents), dict(mesh.shape))
    population = settings.matching is not None
    update, state, inputs = jit_update(step_settings, mesh, state, inputs,
                                       population)
    measure_retention = _retention_measure(config, run, settings.retention)

    if first_step >= config.num_updates:
        log.info("The run in %s already finished %d updates.", workdir,
                 first_step)
        checkpointer.close()
        if all(os.path.isfile(os.path.join(
                folder, outputs_lib.FINAL_METRICS_FILE)) for folder in folders):
            for result in results:
                result.writer.close()
            return _load_final_metrics(folders)
        # Killed after its last checkpoint but before the final files:
        # write them from the saved histories and the restored state.
        last = {name: [result.history[-1][name] for result in results]
                for name in results[0].history[-1] if name != "step"}
        for result in results:
            result.write_figure(first_step)
        _finish(state, results, last, agents, workdir, population,
                is_primary)
        return last

    tokens_per_update = _tokens_per_update(prompt_set, answers, settings)
    started = time.time()
    failed = np.asarray(_fetch(state.agents.failed))
    last = {}
    log.info("Training for %d updates.", config.num_updates)
    for step in range(first_step, config.num_updates):
        tick = time.time()
        if population:
            partner = sweep_lib.partners(agents, settings.matching, step)
            state, metrics = update(state, inputs, partner)
        else:
            partner = None
            state, metrics = update(state, inputs)
        metrics = _fetch(metrics)
        seconds = time.time() - tick
        failed = _report_failures(metrics, failed, agents, step)
        if measure_retention is not None:
            metrics.update(measure_retention(
                step + 1, state, inputs, [r.writer for r in results]))
        done = step + 1
        last = {name: np.asarray(value).tolist()
                for name, value in metrics.items()}

        perf = {"perf/updates_per_sec": 1.0 / seconds,
                "perf/tokens_per_sec": tokens_per_update / seconds}
        log_now = done % config.log_every == 0 or done == config.num_updates
        figure_now = (done % config.figure_every == 0
                      or done == config.num_updates)
        for i, result in enumerate(results):
            record = {name: float(value[i])
                      for name, value in metrics.items()}
            record.update(perf)
            if partner is not None:
                record["population/partner"] = int(partner[i])
            result.append(done, record)
            if log_now:
                result.write_scalars(done, record)
            if figure_now:
                result.write_figure(done)
        if log_now:
            mean = {name: float(np.mean(value))
                    for name, value in metrics.items()}
            print(_progress_line(done, config.num_updates, mean, started,
                                 first_step), flush=True)
        if done % config.checkpoint_every == 0 or done == config.num_updates:
            # Files first, checkpoint last: a run killed between the two
            # resumes from the older checkpoint and rewrites these.
            for result in results:
                result.save_history()
            checkpointer.save(done, state, force=True)

    checkpointer.wait_until_finished()
    checkpointer.close()
    _finish(state, results, last, agents, workdir, population, is_primary)
    return last


def _finish(state, results, last, agents, workdir, population, is_primary):
    """Write every agent's final files and the population table."""
    adapters = _fetch(state.agents.adapter)
    for i, result in enumerate(results):
        agent_last = {name: [values[i]] for name, values in last.items()}
        result.finish(int(state.step), agent_last,
                      jax.tree.map(lambda x, i=i: x[i], adapters))
    if population and is_primary:
        _write_population(workdir, agents, [r.history for r in results])
    log.info("Results are in %s (TensorBoard: tensorboard --logdir %s).",
             workdir, workdir)


def _fetch(tree):
    """Copy arrays sharded over the mesh to host NumPy arrays.

    With several processes each holds only its own shards, so the arrays
    are gathered from all of them first.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    # NOTE: this path has not run on a real multi-host cluster here; it
    # follows the JAX multi-process guide.
    return multihost_utils.process_allgather(tree, tiled=True)


def _report_failures(metrics, failed, agents, step):
    """Log agents that diverged in this update; raise when all have."""
    now = np.asarray(metrics["health/failed"]) > 0
    for i in np.flatnonzero(now & ~failed):
        log.warning(
            "Agent %s diverged at update %d (a non-finite loss, gradient or "
            "parameter); it keeps its last finite adapter and is masked from "
            "now on. Lower optimizer.learning_rate or check the reward "
            "scale.", agents[i].name, step + 1)
    if now.all():
        raise FloatingPointError(
            f"Every agent diverged by update {step + 1} (non-finite loss, "
            "gradient or parameters). Lower optimizer.learning_rate or check "
            "the reward scale; the last checkpoint before this update is "
            "still usable.")
    return now


def _write_population(workdir, agents, histories):
    table = outputs_lib.population_table(agents, histories)
    outputs_lib.write_json(
        os.path.join(workdir, outputs_lib.POPULATION_FILE), table)
    outputs_lib.write_text(os.path.join(workdir, "population.md"),
                           outputs_lib.population_markdown(table))


def _load_final_metrics(folders):
    """Metrics of a finished run, {name: [A] list}, from its agents."""
    merged = {}
    for folder in folders:
        path = os.path.join(folder, outputs_lib.FINAL_METRICS_FILE)
        with open(path) as f:
            metrics = json.load(f)["metrics"]
        for name, values in metrics.items():
            merged.setdefault(name, []).extend(values)
    return merged

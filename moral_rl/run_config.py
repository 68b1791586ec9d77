"""Check a run's ConfigDict and turn it into validated settings.

Everything here runs before any model loads, so a typo in a reward name or
a batch size that does not divide fails in a second, naming the field.
Derived values (reward phases, the PPO dataclass) are returned, never
written back into the config.
"""

import dataclasses
import math

import ml_collections

from moral_rl import ppo
from moral_rl import prompts as prompts_lib
from moral_rl import retention as retention_lib
from moral_rl import sweep as sweep_lib
from moral_rl.games import opponents as opponents_lib
from moral_rl.games import payoffs as payoffs_lib
from moral_rl.games import rewards as rewards_lib
from moral_rl.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Validated settings derived from the config.

    Attributes:
      agents: the AgentSpec of every adapter, in adapter order.
      agent_phases: per agent, ((first update, reward name), ...), sorted,
        starting at update 0.
      matching: the population's matching, or None for scripted opponents.
      action_strings: (C's string, D's string).
      ppo: the PPO dataclass.
      lora: the LoRA spec.
      retention: the probe metrics and regulariser settings.
    """

    agents: tuple[sweep_lib.AgentSpec, ...]
    agent_phases: tuple[tuple[tuple[int, str], ...], ...]
    matching: str | None
    action_strings: tuple[str, str]
    ppo: ppo.PPOConfig
    lora: object
    retention: "RetentionSettings | None" = None

    @property
    def reward_phases(self) -> tuple[tuple[int, str], ...]:
        """The reward phases of the first agent."""
        return self.agent_phases[0]

    @property
    def num_adapters(self) -> int:
        return len(self.agents)


@dataclasses.dataclass(frozen=True)
class RetentionSettings:
    """Validated `config.retention`.

    Attributes:
      probes: the probes in use (empty when nothing needs them).
      max_new_tokens: R, length of the reference greedy answers.
      every: updates between probe metrics; 0 is off.
      text_every: updates between greedy-answer texts; 0 is off.
      coefs: the regulariser's weights, or None when both are zero, which
        leaves the compiled update as it is without retention.
    """

    probes: tuple
    max_new_tokens: int
    every: int
    text_every: int
    coefs: retention_lib.RegulariserCoefs | None

    @property
    def needs_probes(self) -> bool:
        """Whether the run builds probe arrays."""
        return bool(self.every or self.text_every or self.coefs)


def _field_error(field, value, fix):
    return ValueError(f"config.{field}={value!r} is invalid: {fix}.")


def parse_reward_schedule(schedule: str, default: str):
    """Parse "name:updates,name:updates,...,name" into reward phases.

    Each phase but the last lasts the given number of updates; the last runs
    to the end. An empty schedule is one phase of `default`. For example
    "game:500,utilitarian" is Tennant et al.'s unlearning experiment: 500
    updates of the Game reward, then the Utilitarian reward.
    """
    if not schedule:
        return ((0, default),)
    phases, start = [], 0
    parts = [p.strip() for p in schedule.split(",")]
    for position, part in enumerate(parts):
        name, _, length = part.partition(":")
        last = position == len(parts) - 1
        if not last and not length:
            raise _field_error(
                "reward_schedule", schedule,
                f"phase {part!r} needs a length, as in 'game:100'; only the "
                "last phase runs to the end without one")
        phases.append((start, name))
        if length:
            try:
                count = int(length)
            except ValueError:
                count = -1
            if count < 1:
                raise _field_error(
                    "reward_schedule", schedule,
                    f"phase length {length!r} must be a positive integer")
            start += count
    return tuple(phases)


def _check_reward(field, name):
    if name not in rewards_lib.REWARDS:
        raise _field_error(
            field, name, "use one of " + ", ".join(rewards_lib.REWARDS))


def validate(config: ml_collections.ConfigDict) -> RunSettings:
    """Validate a run config; raise ValueError naming the bad field."""
    if config.game not in payoffs_lib.GAMES:
        raise _field_error("game", config.game,
                           "use one of " + ", ".join(payoffs_lib.GAMES))
    _check_opponent("opponent", config.opponent)
    _check_reward("reward", config.reward)
    phases = parse_reward_schedule(config.reward_schedule, config.reward)
    for _, name in phases:
        _check_reward("reward_schedule", name)

    agents = sweep_lib.agent_specs(config)
    agent_phases = []
    for agent in agents:
        agent_phases.append(parse_reward_schedule(agent.reward_schedule, ""))
        for _, name in agent_phases[-1]:
            _check_reward("sweep.rewards or population.rewards", name)
        if agent.opponent != "learner":
            _check_opponent("sweep.opponents", agent.opponent)
    matching = None
    if sweep_lib.population_size(agents):
        matching = config.population.matching
        if matching not in sweep_lib.MATCHINGS:
            raise _field_error("population.matching", matching,
                               "use one of " + ", ".join(sweep_lib.MATCHINGS))
    if config.prompt_template not in prompts_lib.TEMPLATES:
        raise _field_error(
            "prompt_template", config.prompt_template,
            "use one of " + ", ".join(prompts_lib.TEMPLATES))
    try:
        strings = prompts_lib.check_action_strings(
            [s.strip() for s in config.action_strings.split(",")])
    except ValueError as err:
        raise _field_error("action_strings", config.action_strings,
                           f"{err} Write them as 'action1,action2'") from err
    try:
        rewards_lib.make_reward(config.reward, xi=config.xi,
                                r_illegal=config.r_illegal)
    except ValueError as err:
        raise _field_error("xi/r_illegal", (config.xi, config.r_illegal),
                           str(err)) from err

    positive_ints = ("num_updates", "num_games", "rollout_length",
                     "log_every", "checkpoint_every", "figure_every",
                     "keep_checkpoints")
    for field in positive_ints:
        value = config[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _field_error(field, value, "use an integer >= 1")

    opt = config.optimizer
    if not opt.learning_rate > 0:
        raise _field_error("optimizer.learning_rate", opt.learning_rate,
                           "use a positive learning rate such as 1e-4")
    if not opt.max_grad_norm > 0:
        raise _field_error("optimizer.max_grad_norm", opt.max_grad_norm,
                           "use a positive norm such as 1.0")
    if opt.schedule not in ("constant", "cosine", "linear"):
        raise _field_error("optimizer.schedule", opt.schedule,
                           "use 'constant', 'cosine' or 'linear'")
    if not isinstance(opt.warmup_updates, int) or opt.warmup_updates < 0:
        raise _field_error("optimizer.warmup_updates", opt.warmup_updates,
                           "use an integer >= 0")
    if not isinstance(opt.grad_accum_steps, int) or opt.grad_accum_steps < 1:
        raise _field_error("optimizer.grad_accum_steps",
                           opt.grad_accum_steps, "use an integer >= 1")

    try:
        ppo_config = ppo.PPOConfig(**config.ppo.to_dict())
    except TypeError as err:
        raise ValueError(f"config.ppo has an unknown field: {err}.") from err
    except ValueError as err:
        raise ValueError(f"config.ppo: {err}") from err
    batch = config.num_games * config.rollout_length
    if batch % ppo_config.minibatches:
        raise _field_error(
            "ppo.minibatches", ppo_config.minibatches,
            f"it must divide num_games * rollout_length = {batch}")

    try:
        spec = lora_lib.make_lora_spec(config.lora.rank, config.lora.alpha,
                                       config.lora.targets)
    except ValueError as err:
        raise ValueError(f"config.lora: {err}") from err

    if config.model.dtype not in ("float32", "bfloat16"):
        raise _field_error("model.dtype", config.model.dtype,
                           "use 'float32' or 'bfloat16'")
    if (not isinstance(config.adapter_batch, int)
            or config.adapter_batch < 0):
        raise _field_error("adapter_batch", config.adapter_batch,
                           "use 0 (all adapters at once) or a positive "
                           "number of adapters")
    _check_mesh(config.mesh, len(agents), config.num_games)

    return RunSettings(agents=agents, agent_phases=tuple(agent_phases),
                       matching=matching, action_strings=strings,
                       ppo=ppo_config, lora=spec,
                       retention=validate_retention(config.retention))


def _check_opponent(field, name):
    if name not in opponents_lib.OPPONENT_KINDS:
        raise _field_error(
            field, name,
            "use one of " + ", ".join(opponents_lib.OPPONENT_KINDS))


def _check_mesh(mesh, num_adapters, num_games):
    """Check the mesh axes against the agents, games and devices."""
    checks = (("adapter", num_adapters, "the number of agents"),
              ("data", num_games, "num_games"),
              ("model", None, None))
    for axis, size, what in checks:
        value = mesh[axis]
        if not isinstance(value, int) or value < 1:
            raise _field_error(f"mesh.{axis}", value, "use an integer >= 1")
        if size is not None and size % value:
            raise _field_error(f"mesh.{axis}", value,
                               f"it must divide {what} ({size})")


def _check_int(field, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or (
            value < minimum):
        raise _field_error(f"retention.{field}", value,
                           f"use an integer >= {minimum}")


def validate_retention(retention) -> RetentionSettings:
    """Validate `config.retention` and load its probes when they are used."""
    for field, minimum in (("every", 0), ("text_every", 0),
                           ("num_probes", 0), ("max_new_tokens", 1)):
        _check_int(field, retention[field], minimum)
    for field in ("kl_coef", "ptx_coef"):
        value = retention[field]
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0):
            raise _field_error(f"retention.{field}", value,
                               "use a finite number >= 0 (0 turns the term "
                               "off)")
    coefs = None
    if retention.kl_coef or retention.ptx_coef:
        coefs = retention_lib.RegulariserCoefs(
            kl_coef=float(retention.kl_coef),
            ptx_coef=float(retention.ptx_coef))

    settings = RetentionSettings(
        probes=(), max_new_tokens=retention.max_new_tokens,
        every=retention.every, text_every=retention.text_every, coefs=coefs)
    if not settings.needs_probes:
        return settings
    try:
        probes = retention_lib.load_probes(retention.probes_file)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"config.retention.probes_file={retention.probes_file!r} is "
            f"invalid: {err}") from err
    if retention.num_probes > len(probes):
        raise _field_error(
            "retention.num_probes", retention.num_probes,
            f"the probe file has {len(probes)} probes; use at most that "
            "many, or 0 for all")
    if retention.num_probes:
        probes = probes[:retention.num_probes]
    return dataclasses.replace(settings, probes=probes)

"""The agents of one program: sweeps over seeds, rewards and opponents, and
populations of learning agents that play each other.

Every agent is one LoRA adapter of the same frozen base model, so a grid of
seeds x rewards x opponents, or a population of learners, trains in one
jitted update. `agent_specs` turns the config into the agent list, and
`partners` says who plays whom at each update of a population.
"""

import dataclasses

import numpy as np

MATCHINGS = ("fixed", "random", "round_robin")


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """One agent (adapter) of a run.

    Attributes:
      name: folder name of the agent's results.
      seed: the seed that a one-agent run with this agent's settings uses;
        the agent's adapter, games and update keys derive from it alone.
      reward_schedule: the reward or schedule ("game:6,utilitarian").
      opponent: a scripted opponent kind, or "learner" in a population.
      population: index of the agent's population (its seed's group).
      member: index inside the population (-1 without a population).
    """

    name: str
    seed: int
    reward_schedule: str
    opponent: str
    population: int = 0
    member: int = -1


def _split_list(text: str, separator: str) -> list[str]:
    return [item.strip() for item in text.split(separator) if item.strip()]


def _parse_seeds(text: str, default: int) -> list[int]:
    if not text.strip():
        return [default]
    try:
        return [int(item) for item in _split_list(text, ",")]
    except ValueError as err:
        raise ValueError(
            f"config.sweep.seeds={text!r} is invalid: write integers "
            "separated by commas, as in '0,1,2'.") from err


def _reward_label(schedule: str) -> str:
    return schedule.replace(":", "").replace(",", "-")


def agent_specs(config) -> tuple[AgentSpec, ...]:
    """List the run's agents in adapter order.

    Without a sweep or population this is the single agent of the config.
    `config.sweep` crosses seeds x rewards x opponents (seed slowest).
    `config.population.rewards` makes one population of learning agents per
    seed, one member per listed reward.

    Reward lists are separated by ";" because a schedule such as
    "game:6,utilitarian" contains commas.

    Raises:
      ValueError: on an empty or duplicated list entry, a population with an
        odd number of members, or a population combined with a reward or
        opponent sweep.
    """
    seeds = _parse_seeds(config.sweep.seeds, config.seed)
    if len(set(seeds)) != len(seeds):
        raise ValueError(
            f"config.sweep.seeds={config.sweep.seeds!r} repeats a seed; two "
            "agents with the same seed and settings would be identical.")
    default_reward = config.reward_schedule or config.reward
    population = _split_list(config.population.rewards, ";")

    if population:
        if config.sweep.rewards.strip() or config.sweep.opponents.strip():
            raise ValueError(
                "config.population.rewards is set together with "
                "config.sweep.rewards or config.sweep.opponents; a population "
                "lists its members' rewards itself and its members play each "
                "other, so leave the sweep's rewards and opponents empty.")
        if len(population) % 2:
            raise ValueError(
                f"config.population.rewards={config.population.rewards!r} "
                f"has {len(population)} members; members are paired each "
                "update, so list an even number of rewards.")
        return tuple(
            AgentSpec(name=(f"{config.game}__p{member}-"
                            f"{_reward_label(reward)}__seed{seed}"),
                      seed=seed, reward_schedule=reward, opponent="learner",
                      population=group, member=member)
            for group, seed in enumerate(seeds)
            for member, reward in enumerate(population))

    rewards = _split_list(config.sweep.rewards, ";") or [default_reward]
    opponents = (_split_list(config.sweep.opponents, ",")
                 or [config.opponent])
    for field, values in (("rewards", rewards), ("opponents", opponents)):
        if len(set(values)) != len(values):
            raise ValueError(
                f"config.sweep.{field} lists an entry twice ({values}); "
                "remove the repeat.")
    specs = []
    for seed in seeds:
        for reward in rewards:
            for opponent in opponents:
                name = (config.run_name if _is_single(seeds, rewards,
                                                      opponents)
                        and config.run_name else
                        f"{config.game}__{_reward_label(reward)}__"
                        f"{opponent}__seed{seed}")
                specs.append(AgentSpec(name=name, seed=seed,
                                       reward_schedule=reward,
                                       opponent=opponent))
    return tuple(specs)


def _is_single(*lists) -> bool:
    return all(len(values) == 1 for values in lists)


def population_size(specs) -> int:
    """Members per population (0 when the agents face scripted opponents)."""
    members = [spec.member for spec in specs]
    return max(members) + 1 if max(members) >= 0 else 0


def round_robin_pairs(size: int, round_index: int) -> np.ndarray:
    """Partner of each member in round `round_index` of a round robin.

    The circle method: member 0 stays, the others rotate one place a round,
    so over `size - 1` consecutive rounds every pair meets exactly once.
    """
    others = list(range(1, size))
    shift = round_index % (size - 1)
    circle = [0] + others[shift:] + others[:shift]
    partner = np.empty(size, np.int32)
    for i in range(size // 2):
        a, b = circle[i], circle[size - 1 - i]
        partner[a], partner[b] = b, a
    return partner


def partners(specs, matching: str, step: int) -> np.ndarray | None:
    """Adapter index of each agent's partner at update `step`.

    "fixed" pairs members (0, 1), (2, 3), ... for the whole run, which is
    the two-learner setting when a population has two members. "round_robin"
    cycles through all pairings. "random" draws a fresh pairing each update
    from the population's seed and the step, so a resumed run draws the
    same pairings.

    Returns:
      int32 [A], or None when the agents face scripted opponents.
    """
    size = population_size(specs)
    if size == 0:
        return None
    if matching not in MATCHINGS:
        raise ValueError(
            f"config.population.matching={matching!r} is invalid: use one "
            f"of {', '.join(MATCHINGS)}.")

    partner = np.empty(len(specs), np.int32)
    for group in sorted({spec.population for spec in specs}):
        members = [i for i, spec in enumerate(specs)
                   if spec.population == group]
        if matching == "fixed":
            local = np.arange(size) ^ 1
        elif matching == "round_robin":
            local = round_robin_pairs(size, step)
        else:
            rng = np.random.default_rng([specs[members[0]].seed, step])
            order = rng.permutation(size)
            local = np.empty(size, np.int32)
            local[order[0::2]] = order[1::2]
            local[order[1::2]] = order[0::2]
        partner[members] = np.asarray(members)[local]
    return partner

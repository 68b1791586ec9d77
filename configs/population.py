"""Learning opponents: LLM agents that play each other, one adapter each.

The config argument names the experiment, plus `smoke` for a tiny run:
  llm_vs_llm  Tennant et al.'s two-learner setting (Figure 2b): four pairs,
              each of two agents with the same reward (Game, Deontological,
              Utilitarian, Game+Deontological), fixed for the whole run
              (default);
  population  four agents with those four rewards, paired round-robin, so
              every agent meets every other one every three updates.

  python -m moral_rl.main --config=configs/population.py:population

The run folder holds population.json and population.md: each agent's
cooperation, payoff and D|C (exploitation) rate against each partner.
"""

from configs import ipd, sweep

EXPERIMENTS = ("llm_vs_llm", "population")


def get_config(arg=None):
    tokens = [t for t in (arg or "llm_vs_llm").split(",") if t]
    experiment = tokens[0] if tokens and tokens[0] != "smoke" else (
        "llm_vs_llm")
    if experiment not in EXPERIMENTS:
        raise ValueError(
            f"Unknown population experiment {experiment!r}; use one of "
            f"{', '.join(EXPERIMENTS)}, optionally followed by ',smoke'.")
    smoke = "smoke" in tokens
    config = ipd.get_config("utilitarian,smoke" if smoke else "utilitarian")

    if experiment == "llm_vs_llm":
        config.population.rewards = ";".join(
            f"{reward};{reward}" for reward in sweep.PAPER_REWARDS)
        config.population.matching = "fixed"
    else:
        config.population.rewards = ";".join(sweep.PAPER_REWARDS)
        config.population.matching = "round_robin"
    config.adapter_batch = 1
    return config

"""Sweeps of the paper's experiments as one program of many adapters.

The config argument names the experiment, plus `smoke` for a tiny run:
  grid        four rewards (Game, Deontological, Utilitarian,
              Game+Deontological) x seeds 0-4 against Tit-for-Tat, as in
              Tennant et al.'s Figure 2a (default);
  unlearning  Game for the first half of the updates, then Utilitarian or
              Deontological (Figure 3), seeds 0-4.

  python -m moral_rl.main --config=configs/sweep.py:grid \
      --config.sweep.seeds=0,1,2 --workdir=results/grid

Every agent gets its own result folder under the workdir; agent i equals
a one-agent run of configs/ipd.py with its seed and reward. On a machine
whose memory holds fewer adapters than the sweep has, set
--config.adapter_batch to the number that fits: the adapters then run in
chunks of that size inside the same program.
"""

from configs import ipd

PAPER_REWARDS = ("game", "deontological", "utilitarian", "game_deontological")


def get_config(arg=None):
    tokens = [t for t in (arg or "grid").split(",") if t]
    experiment = tokens[0] if tokens and tokens[0] != "smoke" else "grid"
    if experiment not in ("grid", "unlearning"):
        raise ValueError(
            f"Unknown sweep {experiment!r}; use 'grid' or 'unlearning', "
            "optionally followed by ',smoke'.")
    smoke = "smoke" in tokens
    config = ipd.get_config("utilitarian,smoke" if smoke else "utilitarian")

    config.sweep.seeds = "0,1" if smoke else "0,1,2,3,4"
    if experiment == "grid":
        config.sweep.rewards = ";".join(PAPER_REWARDS)
    else:
        config.num_updates = 4 if smoke else 24
        half = config.num_updates // 2
        config.sweep.rewards = (f"game:{half},utilitarian;"
                                f"game:{half},deontological")
    # One adapter at a time keeps a CPU's memory at one run's footprint;
    # raise it on accelerators with room for more.
    config.adapter_batch = 1
    return config

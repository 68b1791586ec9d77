"""Wall time of a sweep as one program against the same agents run apart.

Runs `moral_rl.main` as a user would: once for the whole sweep (every
agent an adapter of one program, configs/sweep.py:grid), then once per
agent with configs/ipd.py. The wall times include start-up (model
loading, reference policy, compilation), which one program pays once.
With --sample K only the first K separate runs are made and their total is
scaled to all agents, which the output says. The separate runs' final
metrics are compared with their agents in the sweep.

  python benchmarks/sweep_vs_separate.py --seeds 0,1,2,3,4 --updates 3 \
      --sample 4 --out results/bench_sweep -- --config.ppo.epochs=1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARDS = ("game", "deontological", "utilitarian", "game_deontological")


def _run(args, workdir):
    command = [sys.executable, "-m", "moral_rl.main", *args,
               f"--workdir={workdir}"]
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - started


def _update_seconds(folder):
    """Return the median time of the updates after the first (which
    includes compilation) from the run's history, or None with one
    update."""
    with open(os.path.join(folder, "history.json")) as f:
        history = json.load(f)
    seconds = [1.0 / row["perf/updates_per_sec"] for row in history
               if row["step"] > 1]
    return statistics.median(seconds) if seconds else None


def _final(folder):
    with open(os.path.join(folder, "final_metrics.json")) as f:
        return json.load(f)["metrics"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--sample", type=int, default=0,
                        help="separate runs to make (0: all)")
    parser.add_argument("--out", default="results/bench_sweep")
    parser.add_argument("--sweep_dir", default="",
                        help="folder of the one-program sweep "
                        "(default: OUT/sweep)")
    parser.add_argument("overrides", nargs="*",
                        help="extra --config.x=y flags for every run")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    agents = [(seed, reward) for seed in seeds for reward in REWARDS]
    common = [f"--config.num_updates={args.updates}", *args.overrides]

    sweep_dir = args.sweep_dir or os.path.join(args.out, "sweep")
    sweep_seconds = _run(["--config=configs/sweep.py:grid",
                          f"--config.sweep.seeds={args.seeds}", *common],
                         sweep_dir)
    print(f"one program, {len(agents)} agents: {sweep_seconds:.0f} s",
          flush=True)

    sample = agents[:args.sample] if args.sample else agents
    separate, separate_updates, largest_difference = [], [], 0.0
    for seed, reward in sample:
        workdir = os.path.join(args.out, f"{reward}__seed{seed}")
        seconds = _run([f"--config=configs/ipd.py:{reward}",
                        f"--config.seed={seed}", *common], workdir)
        separate.append(seconds)
        separate_updates.append(_update_seconds(workdir))
        print(f"separate run {reward} seed {seed}: {seconds:.0f} s",
              flush=True)
        name = f"prisoners_dilemma__{reward}__tit_for_tat__seed{seed}"
        together, alone = _final(os.path.join(sweep_dir, name)), _final(
            workdir)
        for key in ("policy/p_cooperate", "actions/cooperation"):
            largest_difference = max(largest_difference,
                                     abs(together[key][0] - alone[key][0]))

    separate_total = sum(separate) * len(agents) / len(sample)

    # Wall time = start-up + updates. Splitting it shows how the ratio
    # changes with the run length: start-up is paid once by the program
    # and once per agent by separate runs.
    sweep_update = _update_seconds(os.path.join(
        sweep_dir, f"prisoners_dilemma__{REWARDS[0]}__tit_for_tat__"
        f"seed{seeds[0]}"))
    separate_update = (sum(separate_updates) / len(separate_updates)
                       if None not in separate_updates else None)
    steady = {}
    if sweep_update and separate_update:
        steady = {
            "one_program_update_s": sweep_update,
            "separate_update_s": separate_update,
            "one_program_startup_s": sweep_seconds
            - args.updates * sweep_update,
            "separate_startup_s": sum(separate) / len(separate)
            - args.updates * separate_update,
            "update_ratio": sweep_update / (len(agents) * separate_update),
        }
    report = {
        "agents": len(agents), "updates": args.updates,
        "overrides": args.overrides,
        "one_program_s": sweep_seconds,
        "separate_runs_made": len(sample),
        "separate_mean_s": sum(separate) / len(separate),
        "separate_total_s": separate_total,
        "separate_total_is_scaled": len(sample) < len(agents),
        "ratio": sweep_seconds / separate_total,
        "max_metric_difference": largest_difference,
        **steady,
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

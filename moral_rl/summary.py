"""Print the final action types of finished runs as a Markdown table.

  python -m moral_rl.summary results/grid/*
  python -m moral_rl.summary results/grid       # a sweep: all its agents

Each run folder must hold `final_metrics.json` and `config.json`, which
`moral_rl.main` writes. The columns are the fractions of the last update's
games by the agent's action given the opponent's previous move (the action
types of Tennant et al.'s Figure 2), the exact policy probabilities, and
the untuned model's probabilities from the first record of `metrics.jsonl`.
"""

import json
import os
import sys

from moral_rl import run_folders

COLUMNS = (
    # The pipe is escaped, so these labels stay one Markdown table cell.
    ("actions/c_given_c", "C\\|C"),
    ("actions/c_given_d", "C\\|D"),
    ("actions/d_given_c", "D\\|C"),
    ("actions/d_given_d", "D\\|D"),
    ("actions/illegal", "illegal"),
    ("actions/cooperation", "cooperation"),
    ("policy/p_cooperate", "P(C)"),
    ("policy/p_illegal", "P(illegal)"),
)


def run_row(folder: str) -> list[str]:
    """Return one table row for a finished run folder."""
    final_path = os.path.join(folder, "final_metrics.json")
    if not os.path.isfile(final_path):
        raise FileNotFoundError(
            f"{folder!r} has no final_metrics.json; the run has not finished "
            "(start it again with the same --workdir to resume it).")
    with open(final_path) as f:
        final = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        untuned = json.loads(f.readline())

    reward = config["reward_schedule"] or config["reward"]
    cells = [os.path.basename(os.path.normpath(folder)), reward,
             config["opponent"], str(config["seed"]), str(final["step"])]
    for key, _ in COLUMNS:
        values = final["metrics"][key]
        cells.append(f"{sum(values) / len(values):.3f}")
    cells.append(f"{untuned.get('reference/p_cooperate', float('nan')):.4f}")
    cells.append(f"{untuned.get('reference/p_illegal', float('nan')):.4f}")
    return cells


def markdown_table(folders) -> str:
    header = (["run", "reward", "opponent", "seed", "updates"]
              + [label for _, label in COLUMNS]
              + ["untuned P(C)", "untuned P(illegal)"])
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    for folder in run_folders.expand_folders(folders):
        lines.append("| " + " | ".join(run_row(folder)) + " |")
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    print(markdown_table(argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

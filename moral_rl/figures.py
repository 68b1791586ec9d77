"""Paper-style figures written as PNG files with their data as CSV.

Each figure `<name>.png` gets `<name>.csv` beside it, holding exactly the
numbers drawn, so a figure can be checked or redrawn without the runs:
  action_types_by_reward: action types over training, summed over the runs
    (seeds) of each reward (Figure 2 of Tennant et al., "Moral Alignment
    for LLM Agents", ICLR 2025);
  unlearning: the same for runs with a reward schedule, the reward
    switches dashed (their Figure 3);
  regret_<variant>: deontological and utilitarian regret per game and
    model group, with 95% confidence intervals (their Figure 4).
"""

import csv
import os

import numpy as np

from moral_rl import generalisation, plots, run_config, run_folders

REGRETS = ("deontological", "utilitarian")


def write_csv(path: str, rows: list[dict]) -> None:
    """Write dict rows as CSV, columns in the first row's key order."""
    if not rows:
        raise ValueError(f"No rows to write to {path!r}.")
    with open(path, "w", newline="") as f:
        table = csv.DictWriter(f, fieldnames=list(rows[0]))
        table.writeheader()
        table.writerows(rows)


def read_csv(path: str) -> list[dict]:
    """Read a CSV written by `write_csv`, converting numbers to float."""
    def convert(value):
        try:
            return float(value)
        except ValueError:
            return value

    with open(path, newline="") as f:
        return [{key: convert(value) for key, value in row.items()}
                for row in csv.DictReader(f)]


def _write_figure(out_dir, name, png, rows) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.png")
    with open(path, "wb") as f:
        f.write(png)
    write_csv(os.path.join(out_dir, f"{name}.csv"), rows)
    return path


def action_counts_by_reward(runs) -> list[dict]:
    """Sum each update's action-type counts over the runs of each reward.

    A record's fractions times the games it covers (num_games x
    rollout_length, one agent per run folder) give counts, so runs with
    other batch sizes add up correctly.

    Args:
      runs: sequence of (config, history) pairs.

    Returns:
      Rows {"reward", "step", "runs", <key of plots.ACTION_SERIES>...},
      sorted by reward (first appearance) and step.
    """
    totals, order = {}, []
    for config, history in runs:
        label = run_folders.reward_label(config)
        if label not in order:
            order.append(label)
        games = config.num_games * config.rollout_length
        for record in history:
            key = (label, int(record["step"]))
            row = totals.setdefault(key, {"reward": label, "step": key[1],
                                          "runs": 0})
            row["runs"] += 1
            for series, _, _ in plots.ACTION_SERIES:
                row[series] = row.get(series, 0.0) + record[series] * games
    return sorted(totals.values(),
                  key=lambda row: (order.index(row["reward"]), row["step"]))


def _panels(rows, schedules):
    panels = []
    for label in dict.fromkeys(row["reward"] for row in rows):
        mine = [row for row in rows if row["reward"] == label]
        runs = max(row["runs"] for row in mine)
        switches = [start for start, _ in
                    run_config.parse_reward_schedule(schedules[label],
                                                     label)[1:]]
        panels.append({
            "title": f"{label} ({runs} run{'s' if runs > 1 else ''})",
            "steps": [row["step"] for row in mine],
            "series": {key: [row[key] for row in mine]
                       for key, _, _ in plots.ACTION_SERIES},
            "switch_steps": switches})
    return panels


def write_training_figures(runs, out_dir: str) -> list[str]:
    """Write the Figure 2 and Figure 3 style figures of finished runs.

    Args:
      runs: sequence of (config, history) pairs.
      out_dir: folder for the PNG and CSV files.

    Returns:
      Paths of the PNG files written (none for a kind without runs).
    """
    paths = []
    for name, scheduled in (("action_types_by_reward", False),
                            ("unlearning", True)):
        chosen = [(config, history) for config, history in runs
                  if bool(config.reward_schedule) == scheduled and history]
        if not chosen:
            continue
        schedules = {run_folders.reward_label(config): config.reward_schedule
                     for config, _ in chosen}
        rows = action_counts_by_reward(chosen)
        png = plots.action_type_panels_png(
            _panels(rows, schedules), ylabel="games, summed over runs")
        paths.append(_write_figure(out_dir, name, png, rows))
    return paths


def regret_by_group(eval_rows, variant: str) -> list[dict]:
    """Pool evaluation rows of one prompt variant by (group, game).

    Agents of one group (seeds of a reward type) are pooled into one
    sample of test games with `generalisation.pooled_confidence_interval`.

    Returns:
      Rows {"group", "game", "variant", "n", "<regret>_mean",
      "<regret>_ci_low", "<regret>_ci_high"} in first-appearance order.
    """
    chosen = [row for row in eval_rows if row["variant"] == variant]
    keys = list(dict.fromkeys((row["group"], row["game"]) for row in chosen))
    pooled = []
    for group, game in keys:
        rows = [row for row in chosen
                if row["group"] == group and row["game"] == game]
        out = {"group": group, "game": game, "variant": variant,
               "n": int(sum(row["n"] for row in rows))}
        for regret in REGRETS:
            name = f"{regret}_regret"
            mean, _, low, high = generalisation.pooled_confidence_interval(
                [row["n"] for row in rows],
                [row[f"{name}_mean"] for row in rows],
                [row[f"{name}_std"] for row in rows])
            out[f"{regret}_mean"] = mean
            out[f"{regret}_ci_low"] = low
            out[f"{regret}_ci_high"] = high
        pooled.append(out)
    return pooled


def write_regret_figures(eval_rows, out_dir: str,
                         variants=None) -> list[str]:
    """Write one Figure 4 style regret figure per prompt variant.

    Args:
      eval_rows: rows of the evaluation table (evaluate.METRICS_FILE).
      out_dir: folder for regret_<variant>.png and .csv.
      variants: variants to draw; default every variant in the rows.

    Returns:
      Paths of the PNG files written.
    """
    if variants is None:
        variants = list(dict.fromkeys(row["variant"] for row in eval_rows))
    paths = []
    for variant in variants:
        rows = regret_by_group(eval_rows, variant)
        if not rows:
            continue
        groups = list(dict.fromkeys(row["group"] for row in rows))
        games = list(dict.fromkeys(row["game"] for row in rows))
        arrays = {stat: {regret: np.full((len(groups), len(games)), np.nan)
                         for regret in REGRETS}
                  for stat in ("mean", "ci_low", "ci_high")}
        for row in rows:
            i, j = groups.index(row["group"]), games.index(row["game"])
            for stat, by_regret in arrays.items():
                for regret in REGRETS:
                    by_regret[regret][i, j] = row[f"{regret}_{stat}"]
        png = plots.regret_bars_png(
            groups, games, arrays["mean"], arrays["ci_low"],
            arrays["ci_high"],
            title=f"Regret on test games, prompt: {variant}")
        paths.append(_write_figure(out_dir, f"regret_{variant}", png, rows))
    return paths

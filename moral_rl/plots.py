"""Figures of training runs, rendered with matplotlib to PNG bytes."""

import io

import matplotlib
import numpy as np

matplotlib.use("Agg")  # Files only; no display is needed or available.
from matplotlib import pyplot as plt  # noqa: E402  (after the backend)

# Action types in the stacking order of Tennant et al.'s Figure 2, with the
# two illegal types merged.
ACTION_SERIES = (
    ("actions/c_given_c", "C | C", "#2a9d8f"),
    ("actions/c_given_d", "C | D", "#8ab17d"),
    ("actions/d_given_c", "D | C", "#e76f51"),
    ("actions/d_given_d", "D | D", "#f4a261"),
    ("actions/illegal", "illegal", "#9e9e9e"),
)


def action_types_png(steps, history, *, title="", switch_steps=()) -> bytes:
    """Stack the fractions of action types over training.

    Args:
      steps: update indices, one per record.
      history: list of metric dicts with the keys of `ACTION_SERIES`.
      title: figure title.
      switch_steps: updates at which the reward changed (dashed lines).

    Returns:
      PNG file bytes.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    series = [[float(record[key]) for record in history]
              for key, _, _ in ACTION_SERIES]
    ax.stackplot(steps, series, labels=[label for _, label, _ in ACTION_SERIES],
                 colors=[color for _, _, color in ACTION_SERIES])
    for step in switch_steps:
        ax.axvline(step, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(min(steps), max(max(steps), min(steps) + 1))
    ax.set_ylim(0, 1)
    ax.set_xlabel("update")
    ax.set_ylabel("fraction of games")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
              title="action | opponent's last")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def action_type_panels_png(panels, *, ylabel="games") -> bytes:
    """Stack action types over training, one panel per reward.

    Args:
      panels: sequence of dicts with "title", "steps" (update indices),
        "series" ({key of `ACTION_SERIES`: values per step}) and
        "switch_steps" (updates at which the reward changed; dashed lines).
      ylabel: the y axis label, e.g. "games (summed over 5 seeds)".

    Returns:
      PNG file bytes.
    """
    if not panels:
        raise ValueError("action_type_panels_png got no panels to draw.")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.6,
                                                      3.4),
                             dpi=100, squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        steps = panel["steps"]
        ax.stackplot(steps, [panel["series"][key] for key, _, _ in
                             ACTION_SERIES],
                     labels=[label for _, label, _ in ACTION_SERIES],
                     colors=[color for _, _, color in ACTION_SERIES])
        for step in panel.get("switch_steps", ()):
            ax.axvline(step, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(min(steps), max(max(steps), min(steps) + 1))
        ax.set_xlabel("update")
        ax.set_title(panel["title"], fontsize=9)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5),
                       fontsize=8, title="action | opponent's last")
    fig.tight_layout()
    return _png_bytes(fig)


def regret_bars_png(groups, games, means, lows, highs, *, title="") -> bytes:
    """Draw grouped bars of both regrets per game, with confidence bars.

    Args:
      groups: bar labels (reward types or models), one colour each.
      games: x tick labels.
      means, lows, highs: dicts from "deontological" and "utilitarian" to
        float arrays [len(groups), len(games)]; NaN draws no bar.
      title: figure title.

    Returns:
      PNG file bytes.
    """
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(games) + 4),
                                            3.8), dpi=100)
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(games))
    for ax, regret in zip(axes, ("deontological", "utilitarian")):
        mean = np.asarray(means[regret], float)
        error = np.stack([mean - np.asarray(lows[regret], float),
                          np.asarray(highs[regret], float) - mean])
        for i, group in enumerate(groups):
            ax.bar(x + (i - (len(groups) - 1) / 2) * width, mean[i], width,
                   yerr=np.nan_to_num(error[:, i]), capsize=2, label=group)
        ax.set_xticks(x, [game.replace("_", "\n") for game in games],
                      fontsize=7)
        ax.set_ylabel(f"{regret} regret")
        ax.set_title(f"{regret.capitalize()} regret", fontsize=9)
    axes[1].set_ylim(0, 1.05)  # Normalised per game to [0, 1].
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png_bytes(fig)


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

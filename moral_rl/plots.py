"""Figures of training runs, rendered with matplotlib to PNG bytes."""

import io

import matplotlib

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

"""Result folders of a run's agents: metrics, histories, figures, adapters.

A one-agent run writes into its workdir. A run with several agents writes
`sweep.json` into the workdir and one folder per agent under it, each laid
out as a one-agent run, so TensorBoard shows every agent as its own run
and the evaluation reads each folder alone. The joint training checkpoint
of all agents stays in `<workdir>/checkpoints`.
"""

import json
import os
import shutil

import jax
import numpy as np

from moral_rl import plots
from moral_rl import writer as writer_lib
from moral_rl.models import lora as lora_lib

FINAL_METRICS_FILE = "final_metrics.json"
HISTORY_FILE = "history.json"
SWEEP_FILE = "sweep.json"
POPULATION_FILE = "population.json"
ADAPTER_DIR = "adapter"


def agent_folders(workdir: str, agents) -> list[str]:
    """The result folder of each agent."""
    if len(agents) == 1:
        return [workdir]
    return [os.path.join(workdir, agent.name) for agent in agents]


def agent_config(config_dict: dict, agent) -> dict:
    """The run config as seen by one agent: its seed, reward and opponent.

    The sweep fields are cleared so that the result is the config of a
    one-agent run with the same settings (a population member keeps the
    population fields, which name its co-players).
    """
    result = json.loads(json.dumps(config_dict))
    result["seed"] = agent.seed
    schedule = agent.reward_schedule
    if ":" in schedule:
        result["reward_schedule"] = schedule
        result["reward"] = schedule.split(":")[0]
    else:
        result["reward_schedule"] = ""
        result["reward"] = schedule
    result["opponent"] = agent.opponent
    result["run_name"] = agent.name
    result["sweep"] = {"seeds": "", "rewards": "", "opponents": ""}
    result["agent"] = {"name": agent.name, "member": agent.member,
                       "population": agent.population}
    return result


def write_json(path, value):
    """Write JSON atomically: a partial file, then a rename."""
    write_text(path, json.dumps(value, indent=1))


def write_text(path, text: str):
    """Write a text file atomically: a partial file, then a rename."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def load_history(path, step):
    """Per-update records up to `step` (those of a resumed run)."""
    if step == 0 or not os.path.isfile(path):
        return []
    with open(path) as f:
        return [h for h in json.load(f) if h["step"] <= step]


class AgentOutputs:
    """The TensorBoard writer, history and final files of one agent."""

    def __init__(self, folder, *, resume_step, title, switch_steps,
                 is_primary=True):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.title = title
        self.switch_steps = switch_steps
        self.writer = writer_lib.MetricWriter(folder, is_primary=is_primary)
        self.history_path = os.path.join(folder, HISTORY_FILE)
        self.history = load_history(self.history_path, resume_step)
        self.png = None
        if resume_step:
            self.writer.truncate_after(resume_step)

    def append(self, step, record):
        self.history.append({"step": step, **record})

    def write_scalars(self, step, record):
        self.writer.write_scalars(step, record)

    def write_figure(self, step):
        self.png = plots.action_types_png(
            [h["step"] for h in self.history], self.history,
            title=self.title, switch_steps=self.switch_steps)
        self.writer.write_images(step, {"actions/types": self.png})

    def save_history(self):
        write_json(self.history_path, self.history)
        self.writer.flush()

    def finish(self, step, last, adapter):
        """Write final metrics, the figure and the adapter; close the log.

        Args:
          step: the number of updates done.
          last: the last update's metrics of this agent, {name: [value]}.
          adapter: this agent's adapter tree (no adapter axis).
        """
        write_json(os.path.join(self.folder, FINAL_METRICS_FILE),
                   {"step": step, "metrics": last})
        if self.png is not None:
            with open(os.path.join(self.folder, "action_types.png"),
                      "wb") as f:
                f.write(self.png)
        save_adapter(os.path.join(self.folder, ADAPTER_DIR), adapter)
        self.writer.close()


def save_adapter(directory, adapter):
    """Export one agent's adapter and value head for evaluation."""
    # Orbax accepts only absolute paths.
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    lora_lib.save_lora(directory, jax.device_get(adapter))


# The population table's per-pair columns. Each averages a history column
# over the updates in which the two agents met.
PAIR_COLUMNS = {
    "cooperation": "actions/cooperation",
    "payoff": "payoff/agent",
    "exploitation": "actions/d_given_c",
    "deontological_regret": "regret/deontological",
    "utilitarian_regret": "regret/utilitarian",
}
PAIR_TITLES = {
    "cooperation": "Cooperation of the row agent against the column agent",
    "exploitation": "D|C rate of the row agent against the column agent "
                    "(how often it defects on a partner who cooperated)",
    "payoff": "Game payoff per round of the row agent",
    "deontological_regret": "Deontological regret of the row agent",
    "utilitarian_regret": "Utilitarian regret of the row agent",
}


def population_table(agents, histories) -> dict:
    """Who cooperates with whom, from the per-update records.

    Returns:
      {"agents": names, "meetings": [i][j] number of updates i played j,
      and for each key of PAIR_COLUMNS, [i][j] the mean of that column of
      agent i over the updates it played j (None where they never met),
      "last": {key: [i][j] the value at their last meeting}, and
      "overall": {key: [i] the mean over all of i's updates}}.
    """
    names = [agent.name for agent in agents]
    size = len(agents)
    sums = {key: np.zeros((size, size)) for key in PAIR_COLUMNS}
    meetings = np.zeros((size, size), np.int64)
    # The averages include the first updates, when the agents have not
    # learned yet, so the values of each pair's last meeting are kept too.
    last = {key: [[None] * size for _ in range(size)] for key in PAIR_COLUMNS}
    for i, history in enumerate(histories):
        for record in history:
            j = int(record["population/partner"])
            meetings[i, j] += 1
            for key, column in PAIR_COLUMNS.items():
                sums[key][i, j] += record[column]
                last[key][i][j] = record[column]

    table = {"agents": names, "meetings": meetings.tolist(), "last": last}
    played = np.maximum(meetings.sum(axis=1), 1)
    table["overall"] = {key: (total.sum(axis=1) / played).tolist()
                        for key, total in sums.items()}
    for key, total in sums.items():
        table[key] = [[total[i, j] / meetings[i, j] if meetings[i, j]
                       else None for j in range(size)]
                      for i in range(size)]
    return table


def _matrix_markdown(names, rows) -> list[str]:
    lines = ["| agent \\ partner | " + " | ".join(names) + " |",
             "| --- |" + " --- |" * len(names)]
    for name, row in zip(names, rows):
        cells = ["-" if value is None else f"{value:.3f}" for value in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def population_markdown(table) -> str:
    """Render a per-agent summary, then one agent-by-partner table per
    metric, as markdown."""
    names = table["agents"]
    keys = list(PAIR_COLUMNS)
    lines = ["## Each agent over all its games", "",
             "| agent | " + " | ".join(keys) + " |",
             "| --- |" + " --- |" * len(keys)]
    for i, name in enumerate(names):
        cells = [f"{table['overall'][key][i]:.3f}" for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key in ("cooperation", "exploitation"):
        lines += ["", f"## {PAIR_TITLES[key]}, at their last meeting", ""]
        lines += _matrix_markdown(names, table["last"][key])
    for key in keys:
        lines += ["", f"## {PAIR_TITLES[key]}, mean over their meetings",
                  ""]
        lines += _matrix_markdown(names, table[key])
    return "\n".join(lines) + "\n"

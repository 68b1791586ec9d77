"""Read finished run folders: configs, histories and trained adapters.

A run folder contains `config.json`, `history.json`, `final_metrics.json` and
`adapter/`, one adapter saved with `models.lora.save_lora` as
{"lora": tree, "value_head": {"kernel": [D], "bias": []}}, plus orbax
checkpoints of the train state in `checkpoints/`. A sweep folder contains
`sweep.json` ({"agents": [name, ...]}) and one run folder per agent name.
"""

import dataclasses
import json
import os

import jax
import ml_collections

from moral_rl import checkpoint as checkpoint_lib
from moral_rl import run_config
from moral_rl import writer as writer_lib
from moral_rl.models import lora as lora_lib

SWEEP_FILE = "sweep.json"
ADAPTER_SUBDIR = "adapter"
HISTORY_FILE = "history.json"


def expand_folders(paths) -> list[str]:
    """Replace each sweep folder by its agents' run folders, in order.

    Raises:
      FileNotFoundError: for a path that is not a folder, or a sweep agent
        without its folder.
      ValueError: for a folder that is neither a run nor a sweep.
    """
    folders = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"Run folder {path!r} does not exist; pass a run folder "
                "(with config.json) or a sweep folder (with sweep.json).")
        sweep_path = os.path.join(path, SWEEP_FILE)
        if os.path.isfile(sweep_path):
            with open(sweep_path) as f:
                agents = json.load(f)["agents"]
            for name in agents:
                agent = os.path.join(path, name)
                if not os.path.isdir(agent):
                    raise FileNotFoundError(
                        f"Sweep {path!r} lists agent {name!r} but has no "
                        f"folder {agent!r}.")
                folders.append(agent)
        elif os.path.isfile(os.path.join(path, writer_lib.CONFIG_FILE)):
            folders.append(path)
        else:
            raise ValueError(
                f"{path!r} has neither {writer_lib.CONFIG_FILE} nor "
                f"{SWEEP_FILE}; pass a run folder written by moral_rl.main "
                "or a sweep folder.")
    return folders


def load_config(folder: str) -> ml_collections.ConfigDict:
    """Return the ConfigDict a run saved in its config.json."""
    path = os.path.join(folder, writer_lib.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {writer_lib.CONFIG_FILE};"
                                " it is not a run folder.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_history(folder: str) -> list[dict]:
    """Return the per-update metric records of a run's history.json."""
    path = os.path.join(folder, HISTORY_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{folder!r} has no {HISTORY_FILE}; the run saved no update yet.")
    with open(path) as f:
        return json.load(f)


def reward_label(config) -> str:
    """Name a run's reward: its schedule where it has one, else the reward."""
    return config.reward_schedule or config.reward


@dataclasses.dataclass(frozen=True)
class TrainedAgent:
    """One trained adapter and the run it comes from.

    Attributes:
      folder: the run folder.
      config: the run's ConfigDict.
      adapter: {"lora": tree, "value_head": {"kernel": [D], "bias": []}}.
      lora_spec: the adapter's LoRASpec.
      step: the training update the adapter is from, or None if unknown.
      setup: the `train.RunSetup` built to restore a checkpoint (it contains
        the loaded base model), or None.
    """

    folder: str
    config: ml_collections.ConfigDict
    adapter: dict
    lora_spec: object
    step: int | None
    setup: object = None


def _final_step(folder):
    path = os.path.join(folder, "final_metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(json.load(f)["step"])


def _checkpoint_source(folder):
    """Find the joint checkpoint holding a run's adapter.

    Returns:
      (checkpoint folder, config of the checkpointed run, adapter index),
      or None. A run's own checkpoints/ come first (adapter 0). Otherwise
      the parent sweep's checkpoints/, whose config.json describes the
      joint run, hold the agent at its index in sweep.json.
    """
    own = checkpoint_lib.resolve_restore(folder)
    if own is not None:
        if os.path.isfile(os.path.join(folder, SWEEP_FILE)):
            raise ValueError(
                f"{folder!r} is a sweep whose checkpoint holds several "
                "agents; pass the agent folders under it (or the sweep "
                "folder without --step).")
        return own, load_config(folder), 0
    parent = os.path.dirname(os.path.abspath(folder))
    sweep_path = os.path.join(parent, SWEEP_FILE)
    joint = checkpoint_lib.resolve_restore(parent)
    if os.path.isfile(sweep_path) and joint is not None:
        with open(sweep_path) as f:
            agents = json.load(f)["agents"]
        return joint, load_config(parent), agents.index(
            os.path.basename(os.path.abspath(folder)))
    return None


def load_agent(folder: str, step: int | None = None) -> TrainedAgent:
    """Load a run's final adapter, or its adapter at training update `step`.

    The final adapter comes from `adapter/`. A `step` restores the joint
    checkpoint of that update, with `train.build_run` on the checkpointed
    run's config as the restore target, and selects the run's adapter.

    Raises:
      FileNotFoundError: if the folder has no adapter (step None) or no
        finished checkpoint of `step`.
    """
    config = load_config(folder)
    spec = run_config.validate(config).lora
    if step is None:
        path = os.path.join(folder, ADAPTER_SUBDIR)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{folder!r} has no {ADAPTER_SUBDIR}/ folder, so the run has "
                "not finished; resume it with moral_rl.main, or evaluate a "
                "saved checkpoint with --step=N.")
        adapter = lora_lib.load_lora(os.path.abspath(path))
        return TrainedAgent(folder=folder, config=config, adapter=adapter,
                            lora_spec=spec, step=_final_step(folder))

    source = _checkpoint_source(folder)
    if source is None:
        raise FileNotFoundError(
            f"{folder!r} has no finished checkpoint (and no sweep "
            "checkpoint above it), so --step cannot be evaluated; evaluate "
            "its final adapter without --step.")
    directory, joint_config, index = source
    checkpointer = checkpoint_lib.Checkpointer(directory)
    try:
        steps = checkpointer.all_steps()
        if step not in steps:
            raise FileNotFoundError(
                f"{folder!r} has no finished checkpoint of update {step}; "
                f"saved updates are {steps}.")
        # Imported here: train imports the whole training stack.
        from moral_rl import train

        setup = train.build_run(joint_config)
        state = checkpointer.restore(step, target=setup.state)
    finally:
        checkpointer.close()
    adapter = jax.tree.map(lambda x: x[index], state.agents.adapter)
    return TrainedAgent(folder=folder, config=config, adapter=adapter,
                        lora_spec=spec, step=step, setup=setup)

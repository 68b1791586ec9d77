"""Command-line entry point: parse flags, load the config, train.

  python -m moral_rl.main --config=configs/ipd.py:utilitarian \
      [--config.optimizer.learning_rate=3e-5] [--workdir=results/my_run] [--resume]
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from moral_rl import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and switches, e.g. configs/ipd.py:utilitarian.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Run folder for logs, metrics and checkpoints; default "
    "results/<run name>.")
_RESUME = flags.DEFINE_bool(
    "resume", False,
    "Continue the interrupted run in --workdir; fail if it has no checkpoint.")
_RESUME_FROM = flags.DEFINE_string(
    "resume_from", None,
    "Start from another run's checkpoint when --workdir has none.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize first, for runs across several hosts "
    "(see launch/multihost.sh).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 in a multi-host run; unset on Cloud TPU.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in a multi-host run.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
    # Our progress notes at INFO; orbax and jax only when something is wrong.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("moral_rl").setLevel(logging.INFO)
    if _MULTIHOST.value:
        import jax

        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value)
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "results", train.default_run_name(config))
    train.train_and_evaluate(config, workdir, resume=_RESUME.value,
                             resume_from=_RESUME_FROM.value)


def run():
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()

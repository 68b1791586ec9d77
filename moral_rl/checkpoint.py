"""Checkpoints of the train state over one orbax `CheckpointManager`.

Each step is a folder `<directory>/<step>/` with two items: `state`, the
train-state pytree (`ocp.args.StandardSave`), and `metadata`, a JSON dict
(`ocp.args.JsonSave`) with the caller's metadata and the paths of typed
PRNG keys in the state.

Typed PRNG keys (`jax.random.key`) are stored as their `jax.random.key_data`
(uint32), with their path and implementation name in the metadata. The files
then hold plain integer arrays that restore without a target, whatever key
support the installed orbax version has. `restore` wraps the data back into
typed keys with `jax.random.wrap_key_data`, so a restored key draws the same
numbers.

Saves are atomic. With orbax-checkpoint 0.12 on a local file system the
manager uses `AtomicRenameTemporaryPath`: a step is written into
`<step>.orbax-checkpoint-tmp`, a `commit_success.txt` is added and only then
is the folder renamed to `<step>`. `latest_step` and `restore` list only the
finished folders, so a process killed mid-save leaves a temporary folder that
is ignored.
"""

import os

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"
_ITEM_NAMES = (_STATE_ITEM, _METADATA_ITEM)


class Checkpointer:
    """Saves and restores train-state pytrees, keeping the newest few.

    Args:
        directory: folder with one sub-folder per saved step. It is created
            if missing.
        max_to_keep: number of newest checkpoints kept. Older ones are
            deleted after each save.
        save_interval_steps: `save` only writes steps that are a multiple of
            this, unless called with `force=True`.
    """

    def __init__(self, directory, *, max_to_keep=3, save_interval_steps=1):
        if max_to_keep < 1:
            raise ValueError(
                f"max_to_keep={max_to_keep} is invalid. Keep at least 1 checkpoint."
            )
        if save_interval_steps < 1:
            raise ValueError(
                f"save_interval_steps={save_interval_steps} is invalid. Use an "
                "interval of at least 1 step."
            )

        # orbax requires an absolute path.
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=_ITEM_NAMES
        )

    def save(self, step, state, *, metadata=None, force=False):
        """Start saving `state` as checkpoint `step`.

        The save runs in the background after the arrays are copied to the
        host, so `state` may be changed or donated once this returns. Call
        `wait_until_finished` before relying on the files.

        Args:
            step: training step, an int >= 0.
            state: pytree of jax arrays, numpy arrays, Python scalars and typed
                PRNG keys.
            metadata: optional JSON-serialisable dict stored beside the state.
            force: save even if `step` is not a multiple of
                `save_interval_steps`.

        Returns:
            Whether a save was started.
        """
        stored_state, key_impls = _unwrap_keys(state)
        stored_metadata = {"user": metadata or {}, "prng_keys": key_impls}
        args = ocp.args.Composite(
            **{
                _STATE_ITEM: ocp.args.StandardSave(stored_state),
                _METADATA_ITEM: ocp.args.JsonSave(stored_metadata),
            }
        )
        return self._manager.save(int(step), args=args, force=force)

    def latest_step(self):
        """Return the newest finished step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self):
        """Return the finished steps in increasing order."""
        return sorted(self._manager.all_steps())

    def restore(self, step=None, target=None):
        """Restore checkpoint `step` (default: the newest).

        Args:
            step: step to restore, or None for `latest_step()`.
            target: optional pytree with the structure of the saved state.
                Leaves may be concrete values or `jax.ShapeDtypeStruct`s, and
                typed PRNG keys in it may be abstract too. Without a target the
                state comes back as nested dicts and lists, and keys are
                rewrapped only where the saved containers were dicts, lists or
                tuples, because other pytree nodes change their paths.

        Returns:
            The state pytree, with typed PRNG keys rewrapped.

        Raises:
            FileNotFoundError: if there is no finished checkpoint for `step`.
        """
        step = self._resolve_step(step)
        key_impls = self._restore_metadata(step)["prng_keys"]

        if target is None:
            restore_args = ocp.args.StandardRestore()
        else:
            restore_args = ocp.args.StandardRestore(_abstract_key_data(target))
        args = ocp.args.Composite(**{_STATE_ITEM: restore_args})
        stored_state = self._manager.restore(step, args=args)[_STATE_ITEM]

        return _wrap_keys(stored_state, key_impls)

    def metadata(self, step=None):
        """Return the metadata dict saved with `step` (default: the newest)."""
        return self._restore_metadata(self._resolve_step(step))["user"]

    def wait_until_finished(self):
        """Block until background saves are written and renamed into place."""
        self._manager.wait_until_finished()

    def close(self):
        """Finish background saves and release the manager."""
        self._manager.close()

    def _resolve_step(self, step):
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"no finished checkpoint in {self.directory}. Train first, "
                    "or pass the directory of an existing run."
                )
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no finished checkpoint for step {step} in {self.directory}. "
                f"Finished steps: {steps}."
            )
        return step

    def _restore_metadata(self, step):
        args = ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[_METADATA_ITEM]


def checkpoint_dir(workdir):
    """Return the checkpoint folder of the run in `workdir`."""
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


def resolve_restore(workdir, resume_from=None):
    """Choose the checkpoint folder a run starts from.

    Restore order:
      1. the run's own `workdir` checkpoints, so a preempted or restarted run
         continues where it stopped, even when `resume_from` is also set.
      2. the explicit `resume_from` folder (a checkpoint folder, or a workdir
         that has one), to start from another run's state.
      3. a fresh start, returned as None.

    Args:
        workdir: this run's work directory.
        resume_from: optional folder to start from when `workdir` has no
            checkpoint.

    Returns:
        The checkpoint folder to pass to `Checkpointer`, or None.

    Raises:
        FileNotFoundError: if `resume_from` is set but contains no finished
            checkpoint, because silently starting fresh would waste a run.
    """
    own_dir = checkpoint_dir(workdir)
    if _has_finished_checkpoint(own_dir):
        return own_dir

    if resume_from is not None:
        for candidate in (checkpoint_dir(resume_from), os.fspath(resume_from)):
            if _has_finished_checkpoint(candidate):
                return os.path.abspath(candidate)
        raise FileNotFoundError(
            f"resume_from={os.fspath(resume_from)!r} has no finished checkpoint, "
            f"neither in it nor in its {CHECKPOINT_SUBDIR}/ folder. Pass a "
            "checkpoint folder or a workdir of a run that saved one."
        )

    return None


def _has_finished_checkpoint(directory):
    if not os.path.isdir(directory):
        return False
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=_ITEM_NAMES
    )
    try:
        return manager.latest_step() is not None
    finally:
        manager.close()


def _is_key(leaf):
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _unwrap_keys(state):
    """Replace typed keys by their key data and return {path: impl name}."""
    key_impls = {}

    def unwrap(path, leaf):
        if not _is_key(leaf):
            return leaf
        key_impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(leaf))
        return jax.random.key_data(leaf)

    stored_state = jax.tree_util.tree_map_with_path(unwrap, state)
    return stored_state, key_impls


def _abstract_key_data(target):
    """Replace typed keys in `target` by the shape and dtype of their data."""

    def to_key_data(leaf):
        if _is_key(leaf):
            return jax.eval_shape(jax.random.key_data, leaf)
        return leaf

    return jax.tree.map(to_key_data, target)


def _wrap_keys(stored_state, key_impls):
    """Wrap key data back into typed keys at the recorded paths."""

    def wrap(path, leaf):
        impl = key_impls.get(jax.tree_util.keystr(path))
        if impl is None:
            return leaf
        return jax.random.wrap_key_data(leaf, impl=impl)

    return jax.tree_util.tree_map_with_path(wrap, stored_state)

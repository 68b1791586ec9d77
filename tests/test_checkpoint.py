"""Tests for moral_rl.checkpoint: round trips with typed PRNG keys, keep-N,
temporary folders left by a crash, clear errors and the restore order.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl import checkpoint as checkpoint_lib


def make_state():
    return {
        "params": {
            "kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
            "bias": jnp.array([0.5, -1.0, 2.0], dtype=jnp.bfloat16),
        },
        "opt": (np.array([1, 2, 3], np.int32), np.array([0.25], np.float64)),
        "step": 7,
        "learning_rate": 1.5e-5,
        "rng": jax.random.key(42),
    }


def assert_states_equal(restored, original):
    np.testing.assert_array_equal(
        restored["params"]["kernel"], original["params"]["kernel"]
    )
    assert restored["params"]["bias"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(restored["params"]["bias"], np.float32),
        np.asarray(original["params"]["bias"], np.float32),
    )
    assert restored["opt"][0].dtype == np.int32
    np.testing.assert_array_equal(restored["opt"][0], original["opt"][0])
    np.testing.assert_array_equal(restored["opt"][1], original["opt"][1])
    assert int(restored["step"]) == 7
    # jax.eval_shape makes Python floats float32, so allow float32 rounding.
    np.testing.assert_allclose(float(restored["learning_rate"]), 1.5e-5, rtol=1e-6)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.uniform(restored["rng"], (4,)),
        jax.random.uniform(original["rng"], (4,)),
    )


def test_round_trip_concrete_target(tmp_path):
    state = make_state()
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "ckpt")

    assert checkpointer.save(7, state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(target=state)
    checkpointer.close()

    assert_states_equal(restored, state)
    assert isinstance(restored["step"], int)


def test_round_trip_abstract_target(tmp_path):
    state = make_state()
    abstract_state = jax.eval_shape(lambda: make_state())
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "ckpt")
    checkpointer.save(7, state)
    checkpointer.wait_until_finished()

    restored = checkpoint_lib.Checkpointer(tmp_path / "ckpt").restore(7, abstract_state)

    assert_states_equal(restored, state)
    checkpointer.close()


def test_round_trip_without_target(tmp_path):
    state = make_state()
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "ckpt")
    checkpointer.save(7, state)
    checkpointer.close()

    restored = checkpoint_lib.Checkpointer(tmp_path / "ckpt").restore()

    assert_states_equal(restored, state)


def test_keep_n_deletes_old_steps(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=2)

    for step in range(1, 5):
        checkpointer.save(step, {"x": jnp.full((2,), step)})
    checkpointer.wait_until_finished()

    assert checkpointer.all_steps() == [3, 4]
    assert sorted(name for name in os.listdir(tmp_path) if name.isdigit()) == ["3", "4"]
    np.testing.assert_array_equal(checkpointer.restore()["x"], [4, 4])
    checkpointer.close()


def test_save_interval_and_force(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, save_interval_steps=2)

    assert checkpointer.save(2, {"x": 1})
    assert not checkpointer.save(3, {"x": 1})
    assert checkpointer.save(5, {"x": 1}, force=True)
    checkpointer.wait_until_finished()

    assert checkpointer.all_steps() == [2, 5]
    checkpointer.close()


def test_crash_temp_folder_is_ignored(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(tmp_path)
    checkpointer.save(1, {"x": jnp.ones(3)})
    checkpointer.close()
    # A save of step 2 killed before orbax renamed its temporary folder.
    partial = tmp_path / "2.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "half_written").write_bytes(b"\x00" * 16)

    reopened = checkpoint_lib.Checkpointer(tmp_path)

    assert reopened.latest_step() == 1
    np.testing.assert_array_equal(reopened.restore()["x"], [1.0, 1.0, 1.0])
    with pytest.raises(FileNotFoundError, match="no finished checkpoint for step 2"):
        reopened.restore(step=2)
    assert checkpoint_lib.resolve_restore(tmp_path.parent / "none", tmp_path) == str(
        tmp_path
    )
    reopened.close()


def test_restore_without_checkpoint_raises(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "empty")

    with pytest.raises(FileNotFoundError) as error:
        checkpointer.restore()

    assert str(tmp_path / "empty") in str(error.value)
    assert checkpointer.latest_step() is None
    checkpointer.close()


def test_metadata_round_trip(tmp_path):
    checkpointer = checkpoint_lib.Checkpointer(tmp_path)
    metadata = {"config": {"seed": 1, "game": "ipd"}, "episodes": [1, 2]}

    checkpointer.save(3, {"x": 1}, metadata=metadata)
    checkpointer.save(4, {"x": 2})
    checkpointer.wait_until_finished()

    assert checkpointer.metadata(3) == metadata
    assert checkpointer.metadata() == {}
    checkpointer.close()


def test_invalid_options_name_value(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep=0"):
        checkpoint_lib.Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="save_interval_steps=0"):
        checkpoint_lib.Checkpointer(tmp_path, save_interval_steps=0)


def save_one(directory, step):
    checkpointer = checkpoint_lib.Checkpointer(directory)
    checkpointer.save(step, {"x": step})
    checkpointer.close()


def test_resolve_restore_prefers_own_workdir(tmp_path):
    workdir, other = tmp_path / "run", tmp_path / "other"
    save_one(checkpoint_lib.checkpoint_dir(workdir), 5)
    save_one(checkpoint_lib.checkpoint_dir(other), 9)

    chosen = checkpoint_lib.resolve_restore(workdir, resume_from=other)

    assert chosen == checkpoint_lib.checkpoint_dir(workdir)


def test_resolve_restore_uses_resume_path(tmp_path):
    workdir, other = tmp_path / "run", tmp_path / "other"
    save_one(checkpoint_lib.checkpoint_dir(other), 9)

    from_workdir = checkpoint_lib.resolve_restore(workdir, resume_from=other)
    from_folder = checkpoint_lib.resolve_restore(
        workdir, resume_from=checkpoint_lib.checkpoint_dir(other)
    )

    assert from_workdir == os.path.abspath(checkpoint_lib.checkpoint_dir(other))
    assert from_folder == from_workdir


def test_resolve_restore_fresh_start(tmp_path):
    assert checkpoint_lib.resolve_restore(tmp_path / "run") is None


def test_resolve_restore_missing_resume_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no finished checkpoint"):
        checkpoint_lib.resolve_restore(tmp_path / "run", resume_from=tmp_path / "nope")

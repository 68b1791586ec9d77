"""Tests for moral_rl.writer: event files read back with TensorBoard's own
event accumulator, the JSON-lines copy of scalars, truncation on resume and
the atomic config file.
"""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import image as mpl_image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from moral_rl import writer as writer_lib


def load_events(logdir):
    """Return an EventAccumulator over `logdir` with nothing sampled away."""
    size_guidance = {
        event_accumulator.COMPRESSED_HISTOGRAMS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.AUDIO: 0,
        event_accumulator.SCALARS: 0,
        event_accumulator.HISTOGRAMS: 0,
        event_accumulator.TENSORS: 0,
    }
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance=size_guidance
    )
    accumulator.Reload()
    return accumulator


def read_jsonl(logdir):
    with open(os.path.join(logdir, "metrics.jsonl"), encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def test_scalars_round_trip_through_tensorboard(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)

    writer.write_scalars(1, {"ppo/policy_loss": 0.5, "reward/game": jnp.float32(3.0)})
    writer.write_scalars(2, {"ppo/policy_loss": np.float64(0.25)})
    writer.close()

    events = load_events(tmp_path)
    assert set(events.Tags()["scalars"]) == {"ppo/policy_loss", "reward/game"}
    losses = events.Scalars("ppo/policy_loss")
    assert [event.step for event in losses] == [1, 2]
    np.testing.assert_allclose([event.value for event in losses], [0.5, 0.25])
    assert events.Scalars("reward/game")[0].value == 3.0


def test_scalars_jsonl_records(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)

    writer.write_scalars(1, {"a": 1, "b": jnp.array(2.5)})
    writer.write_scalars(2, {"a": np.int32(4)})
    writer.flush()

    expected = [{"step": 1, "a": 1.0, "b": 2.5}, {"step": 2, "a": 4.0}]
    assert read_jsonl(tmp_path) == expected
    writer.close()


def test_scalars_reject_arrays(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)

    with pytest.raises(ValueError, match=r"'loss' has shape \(2,\)"):
        writer.write_scalars(1, {"loss": np.zeros(2)})
    writer.close()


def test_texts_use_text_plugin(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)

    writer.write_texts(3, {"samples/answer": "action1"})
    writer.close()

    events = load_events(tmp_path)
    assert events.PluginTagToContent("text") == {"samples/answer": b""}
    (event,) = events.Tensors("samples/answer")
    assert event.step == 3
    assert event.tensor_proto.string_val == [b"action1"]


def test_images_array_and_png(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :, 0] = 255
    buffer = io.BytesIO()
    mpl_image.imsave(buffer, np.zeros((2, 5, 3), np.uint8), format="png")
    writer = writer_lib.MetricWriter(tmp_path)

    writer.write_images(7, {"plots/red": rgb, "plots/png": buffer.getvalue()})
    writer.close()

    events = load_events(tmp_path)
    (red,) = events.Images("plots/red")
    (png,) = events.Images("plots/png")
    assert red.step == 7
    assert (red.height, red.width) == (4, 6)
    assert (png.height, png.width) == (2, 5)
    decoded = mpl_image.imread(io.BytesIO(red.encoded_image_string), format="png")
    np.testing.assert_allclose(decoded[..., :3], rgb / 255.0)


def test_images_reject_bad_input(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)

    with pytest.raises(ValueError, match="uint8 array"):
        writer.write_images(1, {"bad": np.zeros((4, 4, 3), np.float32)})
    with pytest.raises(ValueError, match="not a PNG file"):
        writer.write_images(1, {"bad": b"GIF89a"})
    writer.close()


def test_hparams_session_start_info(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)

    ppo_hparams = {"clip_eps": np.float32(0.25), "kl_target": None}
    writer.write_hparams({"seed": 3, "ppo": ppo_hparams, "on": True})
    writer.close()

    events = load_events(tmp_path)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    plugin_data = plugin_data_pb2.HParamsPluginData.FromString(content)
    hparams = plugin_data.session_start_info.hparams
    assert set(hparams) == {"seed", "ppo.clip_eps", "ppo.kl_target", "on"}
    assert hparams["seed"].number_value == 3
    assert hparams["ppo.clip_eps"].number_value == 0.25
    assert hparams["ppo.kl_target"].string_value == "None"
    assert hparams["on"].bool_value is True


def test_truncate_after_drops_later_steps(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": step * 1.0})
    writer.close()

    resumed = writer_lib.MetricWriter(tmp_path)
    resumed.truncate_after(3)
    resumed.write_scalars(4, {"loss": 40.0})
    resumed.close()

    assert [record["step"] for record in read_jsonl(tmp_path)] == [1, 2, 3, 4]
    assert read_jsonl(tmp_path)[-1]["loss"] == 40.0
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_truncate_after_purges_tensorboard_events(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)
    for step in range(1, 6):
        writer.write_scalars(step, {"loss": step * 1.0})
    writer.truncate_after(3)
    writer.write_scalars(4, {"loss": 40.0})
    writer.close()

    losses = load_events(tmp_path).Scalars("loss")

    assert [event.step for event in losses] == [1, 2, 3, 4]
    assert losses[-1].value == 40.0


def test_non_primary_writes_nothing(tmp_path):
    logdir = tmp_path / "run"
    writer = writer_lib.MetricWriter(logdir, is_primary=False)

    writer.write_scalars(1, {"loss": 1.0})
    writer.write_texts(1, {"text": "hello"})
    writer.write_images(1, {"image": np.zeros((2, 2, 3), np.uint8)})
    writer.write_hparams({"seed": 0})
    writer.truncate_after(0)
    writer.flush()
    writer.close()

    assert not logdir.exists()


def test_closed_writer_raises(tmp_path):
    writer = writer_lib.MetricWriter(tmp_path)
    writer.close()
    writer.close()

    with pytest.raises(RuntimeError, match="is closed"):
        writer.write_scalars(1, {"loss": 1.0})


def test_write_config_atomic_json(tmp_path):
    writer_lib.write_config(tmp_path, {"seed": 1, "ppo": {"clip_eps": 0.2}})
    writer_lib.write_config(tmp_path, {"seed": 2, "path": tmp_path})

    with open(tmp_path / "config.json", encoding="utf-8") as config_file:
        config = json.load(config_file)
    assert config == {"seed": 2, "path": str(tmp_path)}
    assert os.listdir(tmp_path) == ["config.json"]

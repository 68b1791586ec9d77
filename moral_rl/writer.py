"""Metrics writer: TensorBoard event files plus a JSON-lines copy of scalars.

Only the `tensorboard` package is used, without TensorFlow or torch. Events go
through its `EventFileWriter`, text carries the text plugin's metadata and
hyperparameters use the hparams plugin's session-start summary, so they show
in TensorBoard's Text and HParams dashboards. Every scalar record is also
appended to `metrics.jsonl` as `{"step": s, "name": value, ...}` for analysis
without TensorBoard.
"""

import io
import json
import os
import struct
import tempfile
import time

import numpy as np
from matplotlib import image as mpl_image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type (IHDR byte 25) -> channel count TensorBoard calls colorspace.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class MetricWriter:
    """Writes scalars, images, text and hyperparameters for one run.

    The interface follows clu's metric writers. On a non-primary process
    (`is_primary=False`) every method is a no-op and no file is created, so
    callers need not check the process index themselves.
    """

    def __init__(self, logdir, *, is_primary=True):
        self._logdir = os.fspath(logdir)
        self._is_primary = is_primary
        self._events = None
        self._jsonl = None
        if not is_primary:
            return

        os.makedirs(self._logdir, exist_ok=True)
        self._events = EventFileWriter(self._logdir)
        self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

    @property
    def _jsonl_path(self):
        return os.path.join(self._logdir, METRICS_FILE)

    def write_scalars(self, step, scalars):
        """Write `{name: value}` at `step` to TensorBoard and one JSON line.

        Values may be Python, numpy or jax scalars, and are stored as floats.
        """
        if not self._is_writing():
            return

        step = int(step)
        floats = {name: _to_float(name, value) for name, value in scalars.items()}
        values = [
            summary_pb2.Summary.Value(tag=name, simple_value=value)
            for name, value in floats.items()
        ]
        self._add_summary(step, values)

        record = {"step": step, **floats}
        self._jsonl.write(json.dumps(record) + "\n")

    def write_images(self, step, images):
        """Write `{name: image}` at `step`.

        Args:
            step: training step.
            images: each value is a uint8 array [H, W, 3] (RGB) or [H, W, 4]
                (RGBA), or the bytes of a PNG file.
        """
        if not self._is_writing():
            return

        values = []
        for name, image in images.items():
            png = image if isinstance(image, bytes) else _encode_png(name, image)
            width, height, channels = _png_size(name, png)
            summary_image = summary_pb2.Summary.Image(
                height=height,
                width=width,
                colorspace=channels,
                encoded_image_string=png,
            )
            values.append(summary_pb2.Summary.Value(tag=name, image=summary_image))
        self._add_summary(int(step), values)

    def write_texts(self, step, texts):
        """Write `{name: text}` at `step`. TensorBoard renders the text as Markdown."""
        if not self._is_writing():
            return

        values = [
            summary_pb2.Summary.Value(
                tag=name,
                metadata=text_metadata.create_summary_metadata(
                    display_name=name, description=""
                ),
                tensor=tensor_util.make_tensor_proto(str(text).encode("utf-8")),
            )
            for name, text in texts.items()
        ]
        self._add_summary(int(step), values)

    def write_hparams(self, hparams):
        """Write hyperparameters for TensorBoard's HParams dashboard at step 0.

        Nested dicts are flattened to dotted names. bool, int, float and str
        values are kept, numpy and jax scalars become Python scalars and any
        other value (None, a tuple) is stored as its `str`.
        """
        if not self._is_writing():
            return

        flat = {name: _to_hparam(value) for name, value in _flatten(hparams).items()}
        summary = hparams_summary.hparams_pb(flat)
        self._events.add_event(
            event_pb2.Event(wall_time=time.time(), step=0, summary=summary)
        )

    def truncate_after(self, step):
        """Drop records with a step greater than `step`, for a resumed run.

        `metrics.jsonl` is rewritten atomically (temporary file, then
        `os.replace`). The event file gets a SessionLog.START event at
        `step + 1`, which makes TensorBoard's event accumulator discard the
        older events with larger steps.
        """
        if not self._is_writing():
            return

        step = int(step)
        self._jsonl.close()
        with open(self._jsonl_path, encoding="utf-8") as metrics_file:
            kept_lines = [
                line
                for line in metrics_file
                if line.strip() and json.loads(line)["step"] <= step
            ]
        _write_atomically(self._jsonl_path, "".join(kept_lines))
        self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

        restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._events.add_event(
            event_pb2.Event(wall_time=time.time(), step=step + 1, session_log=restart)
        )

    def flush(self):
        """Write buffered events and JSON lines to disk."""
        if not self._is_writing():
            return
        self._events.flush()
        self._jsonl.flush()

    def close(self):
        """Flush and close the files. Closing twice is allowed."""
        if not self._is_primary or self._events is None:
            return
        self._events.close()
        self._jsonl.close()
        self._events = None

    def _is_writing(self):
        """Return whether to write, raising if this primary writer is closed."""
        if not self._is_primary:
            return False
        if self._events is None:
            raise RuntimeError(
                f"MetricWriter for {self._logdir} is closed. Create a new one to "
                "write more."
            )
        return True

    def _add_summary(self, step, values):
        event = event_pb2.Event(
            wall_time=time.time(),
            step=step,
            summary=summary_pb2.Summary(value=values),
        )
        self._events.add_event(event)


def write_config(logdir, config_dict):
    """Write `config_dict` to `logdir/config.json` atomically.

    The JSON goes to a temporary file in `logdir` first and replaces the
    target with `os.replace`, so a reader never sees a half-written file.
    Values that JSON cannot encode are stored as their `str`.
    """
    logdir = os.fspath(logdir)
    os.makedirs(logdir, exist_ok=True)
    text = json.dumps(config_dict, indent=2, sort_keys=True, default=str)
    _write_atomically(os.path.join(logdir, CONFIG_FILE), text + "\n")


def _write_atomically(path, text):
    directory = os.path.dirname(path)
    handle, temporary_path = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temporary_file:
            temporary_file.write(text)
            temporary_file.flush()
            os.fsync(temporary_file.fileno())
        # mkstemp creates the file private (0600); results are shared files.
        os.chmod(temporary_path, 0o644)
        os.replace(temporary_path, path)
    except BaseException:
        os.unlink(temporary_path)
        raise


def _to_float(name, value):
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"scalar {name!r} has shape {array.shape}, expected a single value. "
            "Reduce it (for example with .mean()) before writing."
        )
    return float(array.reshape(()))


def _to_hparam(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) or (hasattr(value, "shape") and value.shape == ()):
        return np.asarray(value).item()
    return str(value)


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _encode_png(name, image):
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(
            f"image {name!r} has dtype {array.dtype} and shape {array.shape}. "
            "Pass a uint8 array [H, W, 3] or [H, W, 4], or PNG bytes."
        )
    buffer = io.BytesIO()
    mpl_image.imsave(buffer, array, format="png")
    return buffer.getvalue()


def _png_size(name, png):
    """Return (width, height, channels) read from the PNG header."""
    if not png.startswith(_PNG_SIGNATURE) or len(png) < 26:
        raise ValueError(
            f"image {name!r} is bytes but not a PNG file. Pass PNG bytes or a "
            "uint8 array [H, W, 3]."
        )
    width, height = struct.unpack(">II", png[16:24])
    return width, height, _PNG_CHANNELS[png[25]]

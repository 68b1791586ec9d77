"""The multi-adapter FLOP/s benchmark on a tiny random Gemma2 on the CPU.

Pins: the script runs end to end and reports finite, positive numbers.
Its FLOP count of an update is the per-agent count times the number of
agents. Times are reported, never checked.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import adapter_flops
from moral_rl.models import loading
from moral_rl.models.transformer import Transformer

# The CPU needs less memory to compile and run the update in float32 and
# with one adapter's activations at a time (adapter_batch 1), which keeps
# the test under 2 GB; the FLOP count does not depend on either. Small
# games, rank and epochs keep the run short.
_SMALL = ["--shape", "tiny", "--updates", "1", "--games", "64", "--rank",
          "4", "--epochs", "1", "--dtype", "float32", "--adapter_batch", "1"]

_POSITIVE_FIELDS = (
    "base_params", "lora_params", "tokens_per_update", "compile_s",
    "update_s_median", "flop_per_update", "tflop_per_update",
    "tflop_per_adapter", "achieved_tflops", "peak_tflops", "peak_share")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The embedded tokenizer is converted into this folder, so the user's
    # cache is left alone.
    monkeypatch.setenv("MORAL_RL_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow  # Reads the embedded model's tokenizer.
def test_report_fields_and_adapter_scaling(tmp_path):
    out = tmp_path / "report.json"

    report = adapter_flops.main(_SMALL + ["--adapters", "2",
                                          "--out", str(out)])
    one_agent = adapter_flops.build_benchmark(
        adapter_flops.parse_args(_SMALL + ["--adapters", "1"]))

    for field in _POSITIVE_FIELDS:
        value = report[field]
        assert math.isfinite(value), (field, value)
        assert value > 0, (field, value)
    assert report["adapters"] == 2
    assert report["updates"] == 1
    assert report["peak_source"] == "measured"
    assert report["backend"] == "cpu"
    assert out.is_file()
    assert one_agent.settings.num_adapters == 1
    assert report["flop_per_update"] == 2 * one_agent.flop_per_update
    assert report["tokens_per_update"] == 2 * one_agent.tokens_per_update


def test_invalid_adapters_exits():
    with pytest.raises(SystemExit):
        adapter_flops.parse_args(["--adapters", "0"])


def test_random_params_match_shapes():
    config = adapter_flops.model_config("tiny", "bfloat16")

    params = adapter_flops.random_params(jax.random.key(0), config)

    expected = loading.expected_param_shapes(config)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), expected)


def test_random_params_give_finite_logits():
    config = adapter_flops.model_config("tiny", "float32")
    params = adapter_flops.random_params(jax.random.key(0), config)
    model = Transformer(config)
    tokens = jnp.arange(0, 49152, 4096, dtype=jnp.int32)[None]  # [1, 12]
    positions = jnp.arange(tokens.shape[1])[None]

    hidden, _ = model.apply({"params": params}, tokens, positions,
                            jnp.ones_like(tokens, bool))
    logits = model.apply({"params": params}, hidden, method=model.unembed)

    assert np.all(np.isfinite(logits))
    # Not collapsed to one value, and below the final soft cap of 30.
    assert float(jnp.std(logits)) > 0.1
    assert float(jnp.max(jnp.abs(logits))) < 30.0

"""Tests for moral_rl.models.transformer: parity with the PyTorch reference
logits of SmolLM2-135M-Instruct, padding and cache invariance, and the
parameter count of the full-size model.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.models import config as config_lib
from moral_rl.models import lora as lora_lib
from moral_rl.models import sampling
from moral_rl.models.transformer import Transformer, positions_from_valid

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures",
                       "smollm2_reference_logits.npz")
IM_END = 2  # <|im_end|> in the SmolLM2 vocabulary.

# SmolLM2-135M: the numbers of its config.json.
SMOLLM2_135M = config_lib.ModelConfig(
    architecture="llama", vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
    tie_word_embeddings=True)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


def forward_logits(model, params, tokens):
    """Return [T, V] logits of one unpadded sequence."""
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    valid = jnp.ones_like(tokens, bool)
    hidden, _ = model.apply({"params": params}, tokens,
                            positions_from_valid(valid), valid)
    logits = model.apply({"params": params}, hidden,
                         method=Transformer.unembed)
    return np.asarray(logits[0])


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2])
def test_logits_match_pytorch_reference(embedded_model, reference, index):
    model = Transformer(embedded_model.config)
    logits = forward_logits(model, embedded_model.params,
                            reference[f"tokens_{index}"])

    last_error = np.abs(logits[-1] - reference[f"last_logits_{index}"]).max()
    assert last_error <= 1e-3

    sliced = logits[:, reference["vocab_ids"]]
    slice_error = np.abs(sliced - reference[f"slice_logits_{index}"]).max()
    assert slice_error <= 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2])
def test_greedy_tokens_match_reference(embedded_model, reference, index):
    model = Transformer(embedded_model.config)
    tokens = jnp.asarray(reference[f"tokens_{index}"])[None]
    expected = list(reference[f"greedy_{index}"])
    if IM_END in expected:
        expected = expected[:expected.index(IM_END) + 1]

    out = sampling.generate(
        model, {"params": embedded_model.params}, tokens,
        jnp.ones_like(tokens, bool), jax.random.key(0),
        max_new_tokens=len(reference[f"greedy_{index}"]), temperature=0.0,
        stop_tokens=(IM_END,), pad_id=IM_END)

    generated = np.asarray(out.tokens[0])[np.asarray(out.valid[0])]
    assert generated.tolist() == [int(t) for t in expected]


def test_smollm2_parameter_count_by_hand():
    cfg = SMOLLM2_135M
    width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = (
        cfg.hidden_size * width * 2  # q and o
        + cfg.hidden_size * kv_width * 2  # k and v
        + cfg.hidden_size * cfg.intermediate_size * 3  # gate, up, down
        + cfg.hidden_size * 2)  # the two RMSNorm scales
    expected = (cfg.vocab_size * cfg.hidden_size + cfg.num_layers * per_layer
                + cfg.hidden_size)

    model = Transformer(cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens,
                            tokens.astype(bool))["params"]

    assert expected == 134_515_008
    assert lora_lib.count_parameters(shapes) == expected
    assert shapes["layers"]["attn"]["k"]["kernel"].shape == (30, 576, 192)


def tiny_config(**changes):
    fields = dict(architecture="llama", vocab_size=97, hidden_size=32,
                  intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    fields.update(changes)
    return config_lib.ModelConfig(**fields)


def test_left_padding_leaves_logits_unchanged():
    model = Transformer(tiny_config())
    tokens = jnp.array([[5, 17, 3, 42, 8]], jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    params = model.init(jax.random.key(0), tokens, positions_from_valid(valid),
                        valid)["params"]
    plain = forward_logits(model, params, tokens[0])

    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    padded_valid = padded != 0
    hidden, _ = model.apply({"params": params}, padded,
                            positions_from_valid(padded_valid), padded_valid)
    logits = model.apply({"params": params}, hidden,
                         method=Transformer.unembed)

    np.testing.assert_allclose(logits[0, 3:], plain, atol=1e-5)


def test_cached_decoding_matches_full_forward():
    model = Transformer(tiny_config())
    tokens = jnp.array([[5, 17, 3, 42, 8, 60]], jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    params = model.init(jax.random.key(1), tokens, positions_from_valid(valid),
                        valid)["params"]
    full = forward_logits(model, params, tokens[0])

    # First four tokens, then the last two attending to their cache.
    _, cache = model.apply({"params": params}, tokens[:, :4],
                           positions_from_valid(valid[:, :4]), valid[:, :4])
    hidden, _ = model.apply({"params": params}, tokens[:, 4:],
                            positions_from_valid(valid[:, 4:], 4),
                            valid[:, 4:], cache)
    logits = model.apply({"params": params}, hidden,
                         method=Transformer.unembed)

    np.testing.assert_allclose(logits[0], full[4:], atol=1e-5)


def test_untied_init_creates_output_layer():
    model = Transformer(tiny_config(tie_word_embeddings=False))
    tokens = jnp.array([[5, 17, 3]], jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    params = model.init(jax.random.key(2), tokens, positions_from_valid(valid),
                        valid)["params"]

    assert params["lm_head"]["kernel"].shape == (32, 97)
    logits = forward_logits(model, params, tokens[0])
    assert logits.shape == (3, 97)

"""Tests for moral_rl.models.sampling: greedy answers of the embedded model,
top-k/top-p filtering, fixed-key determinism, and agreement between the
frequencies of free sampling and the exact scores of `scoring`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.models import loading, sampling, scoring
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer

ROW = jnp.array([[1.0, 3.0, 2.0, 0.0, 2.5]])


def kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered[0]))).tolist())


def test_top_k_keeps_largest_logits():
    assert kept(sampling.filter_logits(ROW, temperature=1.0, top_k=2,
                                       top_p=1.0)) == {1, 4}
    assert kept(sampling.filter_logits(ROW, temperature=1.0, top_k=1,
                                       top_p=1.0)) == {1}
    assert kept(sampling.filter_logits(ROW, temperature=1.0, top_k=0,
                                       top_p=1.0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_nucleus():
    # Softmax of ROW sorted: 0.463, 0.281, 0.170, 0.063, 0.023, so the mass
    # before the third token is 0.744.
    assert kept(sampling.filter_logits(ROW, temperature=1.0, top_k=0,
                                       top_p=0.7)) == {1, 4}
    assert kept(sampling.filter_logits(ROW, temperature=1.0, top_k=0,
                                       top_p=0.75)) == {1, 4, 2}
    assert kept(sampling.filter_logits(ROW, temperature=1.0, top_k=0,
                                       top_p=0.1)) == {1}
    # Temperature 2 flattens the row to 0.336, 0.262, 0.204, 0.124, 0.075,
    # so the mass before the fourth token is 0.802.
    assert kept(sampling.filter_logits(ROW, temperature=2.0, top_k=0,
                                       top_p=0.75)) == {1, 4, 2}
    assert kept(sampling.filter_logits(ROW, temperature=2.0, top_k=0,
                                       top_p=0.85)) == {1, 4, 2, 0}


def test_filter_logits_divides_by_temperature():
    filtered = sampling.filter_logits(ROW, temperature=2.0, top_k=0,
                                      top_p=1.0)
    np.testing.assert_allclose(filtered, ROW / 2.0)


@pytest.fixture(scope="module")
def peaked_tiny_model(tiny_llama_factory):
    """A tiny Llama whose large output weights give a peaked first token."""
    checkpoint = tiny_llama_factory(tied=False, head_scale=1.0, seed=3)
    source = loading.resolve_source(checkpoint.folder)
    config, params = loading.load_config_and_params(source)
    tokenizer = tokenizer_lib.load_tokenizer(source)
    prompt = tokenizer_lib.encode(tokenizer, tokenizer_lib.render_chat(
        tokenizer, [{"role": "user", "content": "Pick action1 or action2."}]))
    return Transformer(config), {"params": params}, prompt


@pytest.mark.slow
def test_fixed_key_sampling_is_deterministic(peaked_tiny_model):
    model, variables, prompt = peaked_tiny_model
    tokens = jnp.asarray([prompt] * 4, jnp.int32)
    valid = jnp.ones_like(tokens, bool)

    def sample(seed):
        return sampling.generate(model, variables, tokens, valid,
                                 jax.random.key(seed), max_new_tokens=6,
                                 temperature=1.0)

    first, again, other = sample(0), sample(0), sample(1)

    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


@pytest.mark.slow
def test_sample_frequencies_match_scores(peaked_tiny_model):
    model, variables, prompt = peaked_tiny_model
    num_samples = 2000
    tokens = jnp.asarray([prompt] * num_samples, jnp.int32)
    out = sampling.generate(model, variables, tokens,
                            jnp.ones_like(tokens, bool), jax.random.key(7),
                            max_new_tokens=2, temperature=1.0)
    samples = np.asarray(out.tokens)
    assert np.asarray(out.valid).all()

    # First token: the five most frequent ids against their exact scores.
    ids, counts = np.unique(samples[:, 0], return_counts=True)
    top = ids[np.argsort(-counts)[:5]]
    frequency = counts[np.argsort(-counts)[:5]] / num_samples
    assert frequency.sum() > 0.3  # the check needs a peaked distribution
    # Pairs: the three most frequent two-token answers, which tests the
    # cache update between the two sampling steps.
    pairs, pair_counts = np.unique(samples, axis=0, return_counts=True)
    top_pairs = pairs[np.argsort(-pair_counts)[:3]]
    pair_frequency = np.sort(pair_counts)[::-1][:3] / num_samples

    prompt_tokens, prompt_valid = scoring.pad_left([prompt], 0)
    for continuations, observed in ((top[:, None], frequency),
                                    (top_pairs, pair_frequency)):
        scores = scoring.score_continuations(
            model, variables, jnp.asarray(prompt_tokens),
            jnp.asarray(prompt_valid), jnp.asarray(continuations, jnp.int32),
            jnp.ones(continuations.shape, bool))
        probs = np.exp(np.asarray(scores.log_probs[0], np.float64))
        # Four binomial standard deviations: a fixed key makes the check
        # deterministic, and a wrong sampler misses by far more.
        tolerance = 4 * np.sqrt(probs * (1 - probs) / num_samples) + 1e-3
        np.testing.assert_array_less(np.abs(observed - probs), tolerance)


@pytest.mark.slow
def test_greedy_answer_names_paris(embedded_model):
    tokenizer = embedded_model.tokenizer
    prompt = tokenizer_lib.encode(tokenizer, tokenizer_lib.render_chat(
        tokenizer,
        [{"role": "user", "content": "What is the capital of France?"}]))
    tokens = jnp.asarray([prompt], jnp.int32)

    out = sampling.generate(
        Transformer(embedded_model.config), {"params": embedded_model.params},
        tokens, jnp.ones_like(tokens, bool), jax.random.key(0),
        max_new_tokens=12, temperature=0.0,
        stop_tokens=tuple(tokenizer_lib.stop_token_ids(tokenizer)),
        pad_id=tokenizer.pad_token_id)

    answer = tokenizer.decode(np.asarray(out.tokens[0])[np.asarray(out.valid[0])])
    assert "Paris" in answer

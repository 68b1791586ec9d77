"""Tests for moral_rl.models.scoring: exact continuation log-probs on the
embedded SmolLM2 with an iterated prisoner's dilemma prompt, the shared
prefix cache, the context-length check and the padding helpers.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.models import config as config_lib
from moral_rl.models import sampling, scoring
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer, positions_from_valid

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures",
                       "smollm2_reference_logits.npz")
ANSWERS = ("action1", "action2", " action1", " action2")


def ipd_prompts(tokenizer):
    """Return token lists of two IPD prompts that differ in the last round."""
    rules = str(np.load(FIXTURE)["text_1"])
    other = rules.replace("the other player played action2",
                          "the other player played action1")
    assert other != rules
    return [tokenizer_lib.encode(tokenizer, tokenizer_lib.render_chat(
        tokenizer, [{"role": "user", "content": text}]))
        for text in (rules, other)]


def answer_tokens(tokenizer):
    continuations = [tokenizer.encode(a, add_special_tokens=False)
                     for a in ANSWERS]
    scoring.check_prefix_free(continuations)
    return continuations


def score(model_data, prompts, continuations, prefix=None):
    tokens, valid = scoring.pad_left(prompts, model_data.tokenizer.pad_token_id)
    cont, cont_valid = scoring.pad_right(continuations, 0)
    return scoring.score_continuations(
        Transformer(model_data.config), {"params": model_data.params},
        jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(cont),
        jnp.asarray(cont_valid),
        prefix=None if prefix is None else jnp.asarray(prefix, jnp.int32))


@pytest.fixture(scope="module")
def ipd_scores(embedded_model):
    prompts = ipd_prompts(embedded_model.tokenizer)
    continuations = answer_tokens(embedded_model.tokenizer)
    return prompts, continuations, score(embedded_model, prompts,
                                         continuations)


@pytest.mark.slow
def test_answer_probabilities_sum_to_one(ipd_scores):
    _, _, out = ipd_scores
    probs = np.exp(np.asarray(out.log_probs, np.float64))
    rest = np.exp(np.asarray(out.rest_log_prob, np.float64))

    assert probs.shape == (2, 4)
    assert np.all(probs.sum(axis=1) < 1.0)
    np.testing.assert_allclose(probs.sum(axis=1) + rest, 1.0, atol=1e-5)


@pytest.mark.slow
def test_shared_prefix_matches_full_prompts(embedded_model, ipd_scores):
    prompts, continuations, full = ipd_scores
    prefix, rests = scoring.split_common_prefix(prompts)
    assert len(prefix) > 150

    shared = score(embedded_model, rests, continuations, prefix=prefix)

    # The prefix cache changes the fp32 summation order over 30 layers, so
    # log-probs near -13 move by a few 1e-6 relative.
    np.testing.assert_allclose(shared.log_probs, full.log_probs, atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_allclose(np.exp(shared.log_probs),
                               np.exp(full.log_probs), atol=1e-7)
    np.testing.assert_allclose(shared.rest_log_prob, full.rest_log_prob,
                               atol=1e-5)
    np.testing.assert_allclose(shared.last_hidden, full.last_hidden,
                               atol=1e-4)


@pytest.mark.slow
def test_scores_match_full_forward_pass(embedded_model, ipd_scores):
    prompts, continuations, out = ipd_scores
    model = Transformer(embedded_model.config)

    for row, prompt in enumerate(prompts):
        # Each prompt followed by each whole answer, right-padded.
        tokens, valid = scoring.pad_right(
            [prompt + c for c in continuations], 0)
        tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
        hidden, _ = model.apply({"params": embedded_model.params}, tokens,
                                positions_from_valid(valid), valid)
        logits = model.apply({"params": embedded_model.params}, hidden,
                             method=Transformer.unembed)
        log_softmax = np.asarray(jax.nn.log_softmax(logits, axis=-1))

        for k, continuation in enumerate(continuations):
            # Token j of the answer is predicted at the position before it.
            expected = sum(
                log_softmax[k, len(prompt) + j - 1, token]
                for j, token in enumerate(continuation))
            np.testing.assert_allclose(out.log_probs[row, k], expected,
                                       atol=1e-4)


def test_prefix_free_check_rejects_prefix():
    with pytest.raises(ValueError, match=r"\[1, 2\] is a prefix of \[1, 2, 3\]"):
        scoring.check_prefix_free([[1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="Continuation 1 is empty"):
        scoring.check_prefix_free([[4], []])
    scoring.check_prefix_free([[1, 2], [1, 3], [2]])


def test_split_common_prefix_keeps_last():
    prefix, rests = scoring.split_common_prefix([[1, 2, 3, 4], [1, 2, 3, 5]])
    assert prefix == [1, 2, 3]
    assert rests == [[4], [5]]

    prefix, rests = scoring.split_common_prefix([[1, 2, 3], [1, 2, 3]])
    assert prefix == [1, 2]
    assert rests == [[3], [3]]


def test_pad_left_aligns_last_tokens():
    tokens, valid = scoring.pad_left([[5, 6, 7], [8]], pad_id=0)

    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="3 tokens, more than the padded "
                                         "length 2"):
        scoring.pad_left([[5, 6, 7]], pad_id=0, length=2)


def test_log_rest_is_remaining_mass():
    log_probs = jnp.log(jnp.array([[0.25, 0.5], [0.0, 0.1]]))

    np.testing.assert_allclose(np.exp(scoring.log_rest(log_probs)),
                               [0.25, 0.9], rtol=1e-6)


# --- Context length ---------------------------------------------------------

SHORT_CONTEXT = config_lib.ModelConfig(
    architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
    max_position_embeddings=16)


def test_check_context_names_limit():
    scoring.check_context(16, SHORT_CONTEXT)
    with pytest.raises(ValueError, match=r"17 tokens long .* "
                                         r"max_position_embeddings=16\. "
                                         r"Shorten the prompt"):
        scoring.check_context(17, SHORT_CONTEXT)


def test_long_prompt_rejected_by_scoring():
    model = Transformer(SHORT_CONTEXT)
    tokens = jnp.ones((1, 10), jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    params = model.init(jax.random.key(0), tokens, positions_from_valid(valid),
                        valid)
    continuations = jnp.array([[3, 4, 5], [6, 7, 8]], jnp.int32)
    cont_valid = jnp.ones_like(continuations, bool)

    fits = scoring.score_continuations(model, params, tokens, valid,
                                       continuations, cont_valid,
                                       prefix=jnp.ones((3,), jnp.int32))
    assert fits.log_probs.shape == (1, 2)
    with pytest.raises(ValueError, match="17 tokens long"):
        scoring.score_continuations(model, params, tokens, valid,
                                    continuations, cont_valid,
                                    prefix=jnp.ones((4,), jnp.int32))


def test_long_prompt_rejected_by_generate():
    model = Transformer(SHORT_CONTEXT)
    tokens = jnp.ones((2, 12), jnp.int32)
    valid = jnp.ones_like(tokens, bool)
    params = model.init(jax.random.key(0), tokens, positions_from_valid(valid),
                        valid)

    with pytest.raises(ValueError, match="20 tokens long"):
        sampling.generate(model, params, tokens, valid, jax.random.key(1),
                          max_new_tokens=8)

"""Exact action distributions of the LLM policy.

Pins: the legal answers of SmolLM2's tokenizer, grouping of sequence
log-probs into (C, D, illegal), that the tree-structured prompts give the
probabilities of flat prompts, and that exact probabilities match the
frequencies of free sampling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl import policy, prompts
from moral_rl.games import payoffs
from moral_rl.models import loading, sampling, scoring
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer


def test_outcome_log_probs_groups_sequences():
    log_probs = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.05]]))
    rest = jnp.log(jnp.array([0.35]))
    action = jnp.array([0, 0, 1, 1])

    outcome = policy.outcome_log_probs(log_probs, rest, action)

    np.testing.assert_allclose(np.exp(outcome), [[0.3, 0.35, 0.35]],
                               rtol=1e-6)


def test_value_head_starts_at_zero():
    head = policy.init_value_head(8, 3)

    assert head["kernel"].shape == (3, 8)
    assert not np.any(np.asarray(head["kernel"]))
    assert not np.any(np.asarray(head["bias"]))


@pytest.mark.slow
def test_answer_sequences_include_spaced_forms(embedded_model):
    answers = policy.answer_sequences(embedded_model.tokenizer,
                                      ("action1", "action2"))

    assert answers.texts == ("action1", " action1", "action2", " action2")
    assert answers.action.tolist() == [0, 0, 1, 1]
    assert answers.valid.all()


def _answer_arrays(answers):
    return (jnp.asarray(answers.tokens), jnp.asarray(answers.valid),
            jnp.asarray(answers.action))


@pytest.fixture(scope="module")
def tiny_policy(tiny_llama_factory, embedded_model):
    checkpoint = tiny_llama_factory(head_scale=0.5, seed=3)
    source = loading.resolve_source(checkpoint.folder)
    config, params = loading.load_config_and_params(source)
    return Transformer(config), params, embedded_model.tokenizer


@pytest.mark.slow
def test_tree_prompts_match_flat_prompts(tiny_policy):
    model, params, tokenizer = tiny_policy
    prompt_set = prompts.build_prompt_set(
        tokenizer, payoffs.get_game("stag_hunt"))
    answers = policy.answer_sequences(tokenizer, ("action1", "action2"))

    tree_log_probs, _ = policy.policy_outputs(
        model, params, None, prompt_set.arrays(), _answer_arrays(answers))

    sequences = [tokenizer_lib.encode(tokenizer, t) for t in prompt_set.texts]
    tokens, valid = scoring.pad_left(sequences, tokenizer.pad_token_id)
    flat = scoring.score_continuations(
        model, {"params": params}, jnp.asarray(tokens), jnp.asarray(valid),
        jnp.asarray(answers.tokens), jnp.asarray(answers.valid))
    flat_log_probs = policy.outcome_log_probs(
        flat.log_probs, flat.rest_log_prob, jnp.asarray(answers.action))
    np.testing.assert_allclose(np.exp(tree_log_probs),
                               np.exp(flat_log_probs), atol=1e-5)
    np.testing.assert_allclose(np.exp(tree_log_probs).sum(-1), 1.0,
                               atol=1e-5)


@pytest.mark.slow
def test_exact_probabilities_match_sampling(tiny_policy):
    """Free sampling of two tokens lands on each answer as often as scored.

    Answers are the three most frequent two-token samples of a first draw,
    so their probabilities are large enough to measure; a second,
    independent draw is compared with the exact probabilities.
    """
    model, params, tokenizer = tiny_policy
    variables = {"params": params}
    text = tokenizer_lib.render_chat(
        tokenizer, [{"role": "user", "content": "Pick one action."}])
    ids = tokenizer_lib.encode(tokenizer, text)
    samples = 3000
    tokens = jnp.asarray(np.tile(np.asarray(ids, np.int32), (samples, 1)))
    valid = jnp.ones_like(tokens, bool)

    def draw(seed):
        out = sampling.generate(model, variables, tokens, valid,
                                jax.random.key(seed), max_new_tokens=2,
                                temperature=1.0)
        return [tuple(row) for row in np.asarray(out.tokens).tolist()]

    first = draw(0)
    counts = {}
    for pair in first:
        counts[pair] = counts.get(pair, 0) + 1
    chosen = sorted(counts, key=counts.get, reverse=True)[:3]

    score = scoring.score_continuations(
        model, variables, tokens[:1], valid[:1],
        jnp.asarray(chosen, jnp.int32), jnp.ones((3, 2), bool))
    exact = np.exp(np.asarray(score.log_probs[0]))

    second = draw(1)
    for answer, probability in zip(chosen, exact):
        frequency = sum(pair == answer for pair in second) / samples
        tolerance = 4 * np.sqrt(probability * (1 - probability) / samples)
        assert abs(frequency - probability) < tolerance, (answer, frequency,
                                                          probability)

"""Prompt rendering and the prompt tree.

Pins: 24 prompts indexed by (state, order); both action strings and the
payoffs appear; the two action orders are independent; the three-level
token tree reassembles exactly into each prompt's own tokenisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl import prompts
from moral_rl.games import payoffs
from moral_rl.games.payoffs import COOPERATE, DEFECT, ILLEGAL
from moral_rl.models import tokenizer as tokenizer_lib

PD = payoffs.get_game("prisoners_dilemma")
STRINGS = ("action1", "action2")


def test_prompt_states_cover_every_index():
    states = prompts.all_prompt_states()

    assert len(states) == prompts.NUM_PROMPTS == 24
    assert [s.index for s in states] == list(range(24))


def test_prompt_index_matches_states_under_jit():
    states = prompts.all_prompt_states()
    prev_m = jnp.array([s.prev_action_m for s in states])
    prev_o = jnp.array([s.prev_action_o for s in states])
    order = jnp.array([2 * s.named_d_first + s.answer_d_first
                       for s in states])

    index = jax.jit(prompts.prompt_index)(prev_m, prev_o, order)

    assert index.tolist() == list(range(24))


def test_template_shows_payoffs_and_last_round():
    state = prompts.PromptState(DEFECT, COOPERATE, False, False)

    text = prompts.standard_template(PD, STRINGS, state)

    assert "you get 4, they get 0" in text
    assert "you get 0, they get 4" in text
    assert "you played action2 and the other agent played action1" in text
    assert "You got 4 points and the other agent got 0 points" in text
    assert text.endswith("Your answer:")


def test_template_orders_are_independent():
    state = prompts.PromptState(COOPERATE, COOPERATE, True, False)

    text = prompts.standard_template(PD, STRINGS, state)

    assert "one of two actions: action2 or action1" in text
    assert "exactly one of action1 or action2" in text


def test_template_describes_illegal_last_move():
    state = prompts.PromptState(ILLEGAL, DEFECT, False, True)

    text = prompts.standard_template(PD, STRINGS, state)

    assert "did not answer with a valid action" in text
    assert "the other agent played action2" in text
    assert "exactly one of action2 or action1" in text


@pytest.mark.parametrize("strings", [("a",), ("x", "x"), (" a", "b"),
                                     ("", "b")])
def test_invalid_action_strings_raise(strings):
    with pytest.raises(ValueError, match="[Aa]ction strings"):
        prompts.check_action_strings(strings)


def test_unknown_template_raises():
    with pytest.raises(KeyError, match="no_such_template"):
        prompts.get_template("no_such_template")


@pytest.mark.slow
def test_prompt_tree_reassembles_each_prompt(embedded_model):
    tokenizer = embedded_model.tokenizer

    prompt_set = prompts.build_prompt_set(tokenizer, PD)
    root, states, endings = prompt_set.levels

    assert root[0].shape[0] == 1
    assert states[0].shape[0] == prompts.NUM_STATES
    assert endings[0].shape[0] == prompts.NUM_PROMPTS
    for index, text in enumerate(prompt_set.texts):
        state = endings[2][index]
        pieces = [root[0][0][root[1][0]], states[0][state][states[1][state]],
                  endings[0][index][endings[1][index]]]
        expected = tokenizer_lib.encode(tokenizer, text)
        assert np.concatenate(pieces).tolist() == expected


@pytest.mark.slow
def test_prompt_tree_shares_most_tokens(embedded_model):
    prompt_set = prompts.build_prompt_set(embedded_model.tokenizer, PD)
    flat = sum(len(tokenizer_lib.encode(embedded_model.tokenizer, text))
               for text in prompt_set.texts)

    assert prompt_set.num_tokens < 0.5 * flat


@pytest.mark.slow
def test_prompt_longer_than_context_raises(embedded_model):
    with pytest.raises(ValueError, match="context is 100 tokens"):
        prompts.build_prompt_set(embedded_model.tokenizer, PD, max_length=100)

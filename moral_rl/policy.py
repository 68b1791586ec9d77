"""The LLM policy of a matrix game: exact action distributions and values.

For each distinct prompt, the policy's probability of action C (or D) is the
probability that the model's answer starts with one of C's legal token
sequences, computed by teacher forcing. Everything else is the third
outcome, "illegal". Sampling thousands of games from these [P, 3]
distributions costs no further model calls, so the LLM cost grows with the
number of distinct prompts, not the number of games.

Legal answers. Tennant et al. count an answer as legal when the decoded,
whitespace-stripped answer equals an action string, and they sample exactly
as many new tokens as the action string has. Here the legal token sequences
of a string are the tokenizer's encoding of the bare string and, where it
differs, of the string after a space (" action1" is one leading-space token
plus "1" in SmolLM2's vocabulary). Both decode and strip to the string. A
sequence counts however the model would continue after it, as the fixed
answer length of the paper's sampling implies.

Axis letters: A adapters, P prompts, K legal sequences, D model width.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moral_rl.games.payoffs import COOPERATE, DEFECT
from moral_rl.models import scoring
from moral_rl.models.transformer import Transformer

NUM_OUTCOMES = 3  # C, D, illegal, in the order of the game's action codes.


@dataclasses.dataclass(frozen=True)
class AnswerSet:
    """The token sequences that count as legal answers.

    Attributes:
      tokens: [K, C] int32 right-padded sequences.
      valid: [K, C] bool.
      action: [K] int32, the action (COOPERATE or DEFECT) of each sequence.
      texts: [K] the decoded sequences, for logs.
    """

    tokens: np.ndarray
    valid: np.ndarray
    action: np.ndarray
    texts: tuple[str, ...]


def answer_sequences(tokenizer, action_strings) -> AnswerSet:
    """Collect the legal token sequences of (C's string, D's string)."""
    sequences, actions, texts = [], [], []
    for action, string in zip((COOPERATE, DEFECT), action_strings):
        forms = [tokenizer.encode(string, add_special_tokens=False)]
        spaced = tokenizer.encode(" " + string, add_special_tokens=False)
        if spaced != forms[0] and tokenizer.decode(spaced).strip() == string:
            forms.append(spaced)
        for form in forms:
            sequences.append(form)
            actions.append(action)
            texts.append(tokenizer.decode(form))
    scoring.check_prefix_free(sequences)
    tokens, valid = scoring.pad_right(sequences, tokenizer.pad_token_id)
    return AnswerSet(tokens=tokens, valid=valid,
                     action=np.asarray(actions, np.int32), texts=tuple(texts))


def outcome_log_probs(log_probs, rest_log_prob, answer_action):
    """Group per-sequence log-probs into [C, D, illegal] log-probs.

    Args:
      log_probs: [P, K] log-probability of each legal sequence.
      rest_log_prob: [P] log-probability of every other answer.
      answer_action: [K] action of each sequence.

    Returns:
      [P, 3] log-probabilities that sum (in probability) to 1.
    """
    per_action = []
    for action in (COOPERATE, DEFECT):
        mask = answer_action == action
        masked = jnp.where(mask[None, :], log_probs, -jnp.inf)
        per_action.append(jax.nn.logsumexp(masked, axis=-1))
    return jnp.stack([*per_action, rest_log_prob], axis=-1)


def init_value_head(hidden_size: int, num_adapters: int) -> dict:
    """Zero value heads, [A, D] weights and [A] biases.

    A zero head predicts value 0 everywhere, so the first advantages are
    the (normalised) rewards themselves.
    """
    return {"kernel": jnp.zeros((num_adapters, hidden_size), jnp.float32),
            "bias": jnp.zeros((num_adapters,), jnp.float32)}


def policy_outputs(model: Transformer, base_params, adapter, prompts,
                   answers):
    """Exact action distributions and values of one adapter.

    Args:
      model: the Transformer with LoRA (`lora` set), or the base model when
        `adapter` is None (the reference policy).
      base_params: frozen base parameters.
      adapter: {"lora": adapter tree, "value_head": {"kernel" [D],
        "bias" []}} for one adapter, or None.
      prompts: the prompt tree, a sequence of `scoring.PromptLevel`.
      answers: (tokens [K, C], valid [K, C], action [K]) arrays.

    Returns:
      log_probs [P, 3] over (C, D, illegal), and values [P] (zeros for the
      reference policy).
    """
    answer_tokens, answer_valid, answer_action = answers
    variables = {"params": base_params}
    if adapter is not None:
        variables["lora"] = adapter["lora"]

    score = scoring.score_continuations(
        model, variables, None, None, answer_tokens, answer_valid,
        levels=prompts)
    log_probs = outcome_log_probs(score.log_probs, score.rest_log_prob,
                                  answer_action)
    if adapter is None:
        return log_probs, jnp.zeros(log_probs.shape[:1], jnp.float32)

    head = adapter["value_head"]
    hidden = score.last_hidden.astype(jnp.float32)  # [P, D]
    values = hidden @ head["kernel"] + head["bias"]
    return log_probs, values

"""Exact log-probabilities of given continuations after prompts.

This is the building block of the exact action distributions: the
probability that the model's answer starts with a token sequence is the
product of its teacher-forced token probabilities. Everything not covered by
the given continuations is reported as one "rest" probability.

Prompts that share a common beginning (the game rules, say) can pass it as
`prefix`: it runs once, and the prompts attend to its cache, which cuts the
work of the shared part by the batch size.

Functions here compute one adapter's result; callers `jax.vmap` over an
adapter axis.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moral_rl.models.transformer import (KVCache, Transformer,
                                         positions_from_valid)


class ScoreOutput(NamedTuple):
    """Result of `score_continuations`.

    Attributes:
      log_probs: [B, K] log-probability of each continuation after each
        prompt.
      rest_log_prob: [B] log of the probability left for every other answer.
      last_hidden: [B, D] final hidden state at the last prompt token (the
        input of a value head).
    """

    log_probs: jax.Array
    rest_log_prob: jax.Array
    last_hidden: jax.Array


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None):
    """Left-pad token lists into arrays.

    Left padding puts every prompt's last token in the last column, where the
    next-token distribution is read.

    Returns:
      tokens [B, T] int32 and valid [B, T] bool (numpy).
    """
    longest = max(len(s) for s in sequences)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"A sequence has {longest} tokens, more than the "
                         f"padded length {length}.")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            tokens[row, length - len(seq):] = seq
            valid[row, length - len(seq):] = True
    return tokens, valid


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int):
    """Right-pad token lists (continuations) into [K, C] tokens and valid."""
    length = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
        tokens[row, :len(seq)] = seq
        valid[row, :len(seq)] = True
    return tokens, valid


def split_common_prefix(sequences: Sequence[Sequence[int]],
                        keep_last: int = 1):
    """Split token lists into their longest common prefix and the rests.

    Args:
      sequences: token lists.
      keep_last: minimum number of tokens every rest keeps, so each prompt
        still has its own last position.

    Returns:
      (prefix list, list of remaining token lists).
    """
    shortest = min(len(s) for s in sequences)
    common = 0
    while common < shortest - keep_last and all(
            s[common] == sequences[0][common] for s in sequences):
        common += 1
    prefix = list(sequences[0][:common])
    return prefix, [list(s[common:]) for s in sequences]


def check_prefix_free(continuations: Sequence[Sequence[int]]) -> None:
    """Raise if one continuation starts with another.

    The probabilities of prefix-free continuations are of disjoint events,
    so they can be added up and the rest mass is 1 minus their sum.
    """
    for i, first in enumerate(continuations):
        if not first:
            raise ValueError(f"Continuation {i} is empty.")
        for j, second in enumerate(continuations):
            if i != j and list(second[:len(first)]) == list(first):
                raise ValueError(
                    f"Continuation {list(first)} is a prefix of "
                    f"{list(second)}; their probabilities would overlap. "
                    "Pass prefix-free continuations."
                )


def check_context(length: int, config) -> None:
    """Raise if a sequence of `length` tokens exceeds the model's context.

    Callers pass padded lengths, which are static under jit, so a batch is
    rejected when its longest possible sequence does not fit.

    Args:
      length: prompt tokens (with any shared prefix and padding) plus the
        tokens to score or generate after them.
      config: the model's ModelConfig.
    """
    if length > config.max_position_embeddings:
        raise ValueError(
            f"The sequence would be {length} tokens long (prompt plus "
            "continuation), more than the model's context of "
            f"max_position_embeddings={config.max_position_embeddings}. "
            "Shorten the prompt, generate fewer tokens, or use a model "
            "with a longer context."
        )


def log_rest(log_probs):
    """Return log(1 - sum(exp(log_probs))) over the last axis, safely."""
    total = jnp.sum(jnp.exp(log_probs), axis=-1)
    return jnp.log1p(-jnp.clip(total, 0.0, 1.0 - 1e-7))


class PromptLevel(NamedTuple):
    """One level of a prompt tree: token segments that follow a parent row.

    A prompt is the concatenation of one segment per level, each segment
    continuing a row of the level above. Rows that share a parent share its
    computation, so prompts with common parts cost less than flat prompts.

    Attributes:
      tokens: [N, T] left-padded segment tokens.
      valid: [N, T] bool.
      parent: [N] int32 row of the previous level each segment continues;
        ignored on the first level.
    """

    tokens: jax.Array
    valid: jax.Array
    parent: jax.Array


def _gather_rows(cache: KVCache, rows) -> KVCache:
    return KVCache(k=cache.k[:, rows], v=cache.v[:, rows],
                   positions=cache.positions[rows], valid=cache.valid[rows])


def encode_prompt_tree(model: Transformer, variables, levels):
    """Run the model over a prompt tree, level by level.

    Args:
      model: the Transformer.
      variables: its variables.
      levels: sequence of PromptLevel; the last level's rows are the prompts.

    Returns:
      last_hidden [N, D] at each prompt's last token, the KVCache of each
      whole prompt [.., N, S, ..], and each prompt's length in tokens [N].
    """
    cache, lengths, hidden = None, None, None
    for depth, level in enumerate(levels):
        rows = level.tokens.shape[0]
        if depth == 0:
            start = jnp.zeros((rows,), jnp.int32)
            parent_cache = None
        else:
            start = lengths[level.parent]
            parent_cache = _gather_rows(cache, level.parent)
        positions = positions_from_valid(level.valid, start)
        hidden, new_cache = model.apply(variables, level.tokens, positions,
                                        level.valid, parent_cache)
        cache = (new_cache if parent_cache is None
                 else parent_cache.concat(new_cache))
        lengths = start + jnp.sum(level.valid, axis=1, dtype=jnp.int32)
    return hidden[:, -1], cache, lengths


def levels_from_prefix(tokens, valid, prefix=None):
    """Express prompts with an optional shared prefix as a prompt tree."""
    batch = tokens.shape[0]
    prompts = PromptLevel(tokens, valid, jnp.zeros((batch,), jnp.int32))
    if prefix is None or not prefix.shape[0]:
        return (prompts,)
    root = PromptLevel(prefix[None, :], jnp.ones((1, prefix.shape[0]), bool),
                       jnp.zeros((1,), jnp.int32))
    return (root, prompts)


def score_continuations(model: Transformer, variables, tokens, valid,
                        continuations, continuation_valid,
                        prefix=None, levels=None) -> ScoreOutput:
    """Teacher-force each continuation after each prompt.

    log P(c | prompt) = sum_i log p(c_i | prompt, c_<i) over c's valid tokens.

    Args:
      model: the Transformer (with or without LoRA).
      variables: {"params": base} plus {"lora": one adapter} if adapted.
      tokens: [B, T] left-padded prompt tokens (after `prefix`); None when
        `levels` is given.
      valid: [B, T] bool; None when `levels` is given.
      continuations: [K, C] right-padded continuation tokens, prefix-free.
      continuation_valid: [K, C] bool; column 0 must be all True.
      prefix: optional [P] tokens that come before every prompt.
      levels: a prompt tree (sequence of PromptLevel) in place of tokens,
        valid and prefix.

    Returns:
      ScoreOutput with [B, K] log-probs, [B] rest log-prob, [B, D] hidden.
    """
    if levels is None:
        levels = levels_from_prefix(tokens, valid, prefix)
    num_cont, cont_len = continuations.shape
    padded_prompt = sum(level.tokens.shape[1] for level in levels)
    check_context(padded_prompt + cont_len, model.config)
    last_hidden, cache, prompt_lengths = encode_prompt_tree(
        model, variables, levels)
    batch = last_hidden.shape[0]

    # First continuation token, read at the last prompt position.
    first_logits = model.apply(variables, last_hidden,
                               method=Transformer.unembed)
    first_log_probs = jax.nn.log_softmax(first_logits, axis=-1)  # [B, V]
    log_probs = first_log_probs[:, continuations[:, 0]]  # [B, K]

    # Later tokens: feed every continuation (all but its last token) after
    # each prompt in one row per prompt, one segment per continuation, so
    # the continuations share the prompt's cache without copying it.
    if cont_len > 1:
        steps = cont_len - 1
        inputs = jnp.tile(continuations[:, :-1].reshape(-1), (batch, 1))
        inputs_valid = jnp.tile(continuation_valid[:, :-1].reshape(-1),
                                (batch, 1))  # [B, K*(C-1)]
        segments = jnp.tile(jnp.repeat(jnp.arange(num_cont), steps),
                            (batch, 1))
        offsets = jnp.tile(jnp.arange(steps), num_cont)
        cont_positions = prompt_lengths[:, None] + offsets[None, :]
        cont_hidden, _ = model.apply(
            variables, inputs, cont_positions, inputs_valid, cache,
            segments)
        cont_logits = model.apply(variables, cont_hidden,
                                  method=Transformer.unembed)
        cont_log_probs = jax.nn.log_softmax(cont_logits, axis=-1)
        targets = jnp.tile(continuations[:, 1:].reshape(-1), (batch, 1))
        picked = jnp.take_along_axis(cont_log_probs, targets[..., None],
                                     axis=-1)[..., 0]  # [B, K*(C-1)]
        target_valid = jnp.tile(continuation_valid[:, 1:].reshape(-1),
                                (batch, 1))
        later = jnp.where(target_valid, picked, 0.0)
        log_probs = log_probs + later.reshape(batch, num_cont, steps).sum(-1)

    return ScoreOutput(log_probs=log_probs, rest_log_prob=log_rest(log_probs),
                       last_hidden=last_hidden)

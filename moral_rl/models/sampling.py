"""Autoregressive sampling with a key/value cache, jitted end to end.

The prompt runs once (prefill) into a cache sized for the prompt plus the
new tokens; each new token then costs one single-token step that writes its
keys and values into the next cache slot. The loop is a `lax.scan` over a
fixed number of steps, and rows that have produced a stop token only emit
padding afterwards.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moral_rl.models.scoring import check_context
from moral_rl.models.transformer import (KVCache, Transformer,
                                         positions_from_valid)


class GenerateOutput(NamedTuple):
    """Result of `generate`.

    Attributes:
      tokens: [B, N] new tokens; after a stop token, `pad_id`.
      valid: [B, N] bool, True for generated tokens up to and including the
        stop token.
    """

    tokens: jax.Array
    valid: jax.Array


def filter_logits(logits, *, temperature: float, top_k: int, top_p: float):
    """Apply temperature, top-k and top-p (nucleus) filtering.

    Args:
      logits: [B, V] float32.
      temperature: > 0; callers handle greedy decoding (temperature 0).
      top_k: keep the k largest logits; 0 keeps all.
      top_p: keep the smallest set of tokens whose probability reaches
        top_p; 1.0 keeps all.

    Returns:
      [B, V] logits with filtered entries at -inf.
    """
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly above each sorted entry; keep entries that start
        # below top_p, so the most likely token always stays.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _write_slot(cache: KVCache, step_cache: KVCache, index) -> KVCache:
    """Write one step's keys and values into slot `index` of the cache."""
    return KVCache(
        k=jax.lax.dynamic_update_slice_in_dim(cache.k, step_cache.k, index, 2),
        v=jax.lax.dynamic_update_slice_in_dim(cache.v, step_cache.v, index, 2),
        positions=jax.lax.dynamic_update_slice_in_dim(
            cache.positions, step_cache.positions, index, 1),
        valid=jax.lax.dynamic_update_slice_in_dim(
            cache.valid, step_cache.valid, index, 1))


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p",
    "stop_tokens", "pad_id"))
def generate(model: Transformer, variables, tokens, valid, key, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: tuple[int, ...] = (),
             pad_id: int = 0) -> GenerateOutput:
    """Sample continuations of left-padded prompts.

    Args:
      model: the Transformer (with or without LoRA).
      variables: {"params": ...} plus {"lora": one adapter} if adapted.
      tokens: [B, T] left-padded prompt tokens.
      valid: [B, T] bool.
      key: PRNG key for sampling.
      max_new_tokens: N, number of sampling steps.
      temperature: 0 for greedy decoding, else the softmax temperature.
      top_k, top_p: filters, see `filter_logits`.
      stop_tokens: ids that end a row's answer.
      pad_id: token written after a row has stopped.

    Returns:
      GenerateOutput with [B, N] tokens and valid mask.
    """
    batch, prompt_len = tokens.shape
    check_context(prompt_len + max_new_tokens, model.config)
    positions = positions_from_valid(valid)
    hidden, prompt_cache = model.apply(variables, tokens, positions, valid)

    # A cache with room for every new token; empty slots are not valid.
    def grow(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, max_new_tokens)
        return jnp.pad(x, pad)

    cache = KVCache(k=grow(prompt_cache.k, 2), v=grow(prompt_cache.v, 2),
                    positions=grow(prompt_cache.positions, 1),
                    valid=grow(prompt_cache.valid, 1))
    next_position = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]
    logits = model.apply(variables, hidden[:, -1], method=Transformer.unembed)
    stop = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def step(carry, step_index):
        cache, logits, next_position, done, key = carry
        key, sample_key = jax.random.split(key)
        if temperature == 0:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            filtered = filter_logits(logits, temperature=temperature,
                                     top_k=top_k, top_p=top_p)
            token = jax.random.categorical(sample_key, filtered).astype(
                jnp.int32)
        emitted = ~done
        token = jnp.where(emitted, token, pad_id)
        done = done | jnp.isin(token, stop)

        # Run the new token and store its keys and values.
        step_valid = emitted[:, None]
        hidden, step_cache = model.apply(
            variables, token[:, None], next_position[:, None], step_valid,
            cache)
        cache = _write_slot(cache, step_cache, prompt_len + step_index)
        logits = model.apply(variables, hidden[:, -1],
                             method=Transformer.unembed)
        carry = (cache, logits, next_position + 1, done, key)
        return carry, (token, emitted)

    done = jnp.zeros((batch,), bool)
    carry = (cache, logits, next_position, done, key)
    _, (new_tokens, emitted) = jax.lax.scan(
        step, carry, jnp.arange(max_new_tokens))
    return GenerateOutput(tokens=new_tokens.T, valid=emitted.T)

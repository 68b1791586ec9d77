"""Decoder-only transformer in Flax: Llama, Gemma2 and Gemma3 text models.

One module family covers the three architectures; `ModelConfig` switches
the parts that differ (GeGLU vs SwiGLU, extra norms, QK-norm, soft-capping,
local/global layers). The layers run under `nn.scan`, so parameters carry
a leading layer axis L and the block compiles once.

Axis letters in shape comments and einsums:
  B batch, T new tokens, S attended tokens (cache plus new), D model width,
  N query heads, K key/value heads, G query heads per key/value head (N/K),
  H head width, F MLP width, V vocabulary, L layers.

Attention masking works on positions, not indices: a query at position p
sees every valid key at position <= p (and > p - window on local layers).
The same rule serves left-padded prompts, a shared-prefix cache and
incremental decoding.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moral_rl.models.config import ModelConfig

# Large negative logit for masked keys; finite so a fully masked row (a
# padding query) gives a uniform softmax instead of NaN.
_MASKED_LOGIT = -1e30


@struct.dataclass
class KVCache:
    """Keys and values of tokens already processed, for every layer.

    Attributes:
      k: keys [L, B, S, K, H].
      v: values [L, B, S, K, H].
      positions: position of each cached token [B, S] int32.
      valid: whether each cached slot holds a real token [B, S] bool.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array

    def broadcast_to(self, batch: int) -> "KVCache":
        """Repeat a batch-1 cache (a shared prompt prefix) to `batch` rows."""
        def expand(x, axis):
            shape = list(x.shape)
            shape[axis] = batch
            return jnp.broadcast_to(x, shape)

        return KVCache(
            k=expand(self.k, 1), v=expand(self.v, 1),
            positions=expand(self.positions, 0), valid=expand(self.valid, 0))

    def concat(self, other: "KVCache") -> "KVCache":
        """Append `other`'s tokens after this cache's tokens."""
        return KVCache(
            k=jnp.concatenate([self.k, other.k], axis=2),
            v=jnp.concatenate([self.v, other.v], axis=2),
            positions=jnp.concatenate([self.positions, other.positions], 1),
            valid=jnp.concatenate([self.valid, other.valid], axis=1))


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """The dense layers that carry a low-rank adapter, and its size.

    Attributes:
      rank: r, the inner width of the adapter.
      alpha: the adapter output is scaled by alpha / rank.
      targets: layer names among q, k, v, o, gate, up, down.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _dtype(name: str):
    return jnp.dtype(name)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by (offset + scale)."""

    eps: float
    offset: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + scale.astype(jnp.float32))).astype(
            self.dtype)


class Dense(nn.Module):
    """Bias-free dense layer with an optional LoRA adapter.

    The adapter lives in the separate `lora` collection beside `kernel`:
    `a` [in, r] and `b` [r, out]. The output is x W + (alpha / r) x A B, so
    with B = 0 the layer equals the base layer exactly.
    """

    features: int
    lora_rank: int = 0
    lora_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (fan_in, self.features), self.param_dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if not self.lora_rank:
            return y

        # Adapters start at zero here; `lora.init_lora` draws A at random.
        a = self.variable("lora", "a", jnp.zeros, (fan_in, self.lora_rank),
                          self.param_dtype).value
        b = self.variable("lora", "b", jnp.zeros,
                          (self.lora_rank, self.features),
                          self.param_dtype).value
        update = jnp.dot(jnp.dot(x, a.astype(self.dtype)), b.astype(self.dtype))
        return y + self.lora_scale * update


def apply_rope(x, positions, inv_freq):
    """Rotate query or key features by their positions (RoPE).

    Uses the half-split layout of Hugging Face checkpoints: feature i pairs
    with feature i + H/2.

    Args:
      x: [B, T, heads, H].
      positions: [B, T] int.
      inv_freq: [H/2] inverse frequencies, theta ** (-2i / H) divided by
        the linear position scale (`ModelConfig.layer_rope_frequencies`).

    Returns:
      [B, T, heads, H] in x's dtype.
    """
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    return rotated.astype(x.dtype)


def _softcap(x, cap):
    return x if cap is None else jnp.tanh(x / cap) * cap


def _lora_args(lora: LoRASpec | None, name: str) -> dict:
    if lora is None or name not in lora.targets:
        return {}
    return {"lora_rank": lora.rank, "lora_scale": lora.scale}


class Attention(nn.Module):
    """Grouped-query self-attention over a cache plus the new tokens."""

    config: ModelConfig
    lora: LoRASpec | None = None

    @nn.compact
    def __call__(self, x, positions, valid, cache, window, inv_freq,
                 segments=None):
        """Attend from the new tokens to the cache and to themselves.

        Args:
          x: [B, T, D] normalised hidden states.
          positions: [B, T] int32 token positions.
          valid: [B, T] bool, False for padding.
          cache: None, or (k, v, positions, valid) of earlier tokens with
            shapes [B, S0, K, H] twice, [B, S0] twice.
          window: attention window in tokens (scalar int32).
          inv_freq: this layer's RoPE inverse frequencies [H/2].
          segments: None, or [B, T] int32 segment ids of the new tokens; a
            new token then sees only new tokens of its own segment (and the
            whole cache).

        Returns:
          output [B, T, D] and the new tokens' (k, v), each [B, T, K, H].
        """
        cfg = self.config
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def dense(features, name):
            return Dense(features, dtype=dtype, param_dtype=pdtype, name=name,
                         **_lora_args(self.lora, name))

        q = dense(heads * head_dim, "q")(x).reshape(batch, length, heads, head_dim)
        k = dense(kv_heads * head_dim, "k")(x).reshape(
            batch, length, kv_heads, head_dim)
        v = dense(kv_heads * head_dim, "v")(x).reshape(
            batch, length, kv_heads, head_dim)
        if cfg.qk_norm:
            norm_args = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                             dtype=dtype, param_dtype=pdtype)
            q = RMSNorm(name="q_norm", **norm_args)(q)
            k = RMSNorm(name="k_norm", **norm_args)(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        new_kv = (k, v)

        # Keys and values: the cache first, then the new tokens.
        if cache is None:
            keys, values, key_positions, key_valid = k, v, positions, valid
        else:
            cache_k, cache_v, cache_positions, cache_valid = cache
            keys = jnp.concatenate([cache_k.astype(dtype), k], axis=1)
            values = jnp.concatenate([cache_v.astype(dtype), v], axis=1)
            key_positions = jnp.concatenate([cache_positions, positions], 1)
            key_valid = jnp.concatenate([cache_valid, valid], axis=1)

        query_scalar = cfg.query_pre_attn_scalar or head_dim
        q = q * jnp.asarray(query_scalar ** -0.5, dtype)
        groups = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, groups, head_dim)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys,
                            preferred_element_type=jnp.float32)
        logits = _softcap(logits, cfg.attn_logit_softcap)

        # [B, T, S]: valid key, not in the future, inside the window.
        offset = positions[:, :, None] - key_positions[:, None, :]
        allowed = key_valid[:, None, :] & (offset >= 0) & (offset < window)
        if segments is not None:
            same = segments[:, :, None] == segments[:, None, :]  # [B, T, T]
            cached = keys.shape[1] - length
            shared = jnp.ones((batch, length, cached), bool)
            allowed = allowed & jnp.concatenate([shared, same], axis=2)
        logits = jnp.where(allowed[:, None, None], logits, _MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)

        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values)
        out = out.reshape(batch, length, heads * head_dim)
        return dense(cfg.hidden_size, "o")(out), new_kv


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU."""

    config: ModelConfig
    lora: LoRASpec | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)

        def dense(features, name):
            return Dense(features, dtype=dtype, param_dtype=pdtype, name=name,
                         **_lora_args(self.lora, name))

        gate = dense(cfg.intermediate_size, "gate")(x)  # [B, T, F]
        if cfg.mlp_activation == "silu":
            gate = jax.nn.silu(gate)
        else:
            gate = jax.nn.gelu(gate, approximate=True)
        up = dense(cfg.intermediate_size, "up")(x)
        return dense(cfg.hidden_size, "down")(gate * up)


class Block(nn.Module):
    """One decoder layer; scanned over layers by `Transformer`."""

    config: ModelConfig
    lora: LoRASpec | None = None

    @nn.compact
    def __call__(self, h, layer_inputs, positions, valid, cache_meta,
                 segments):
        cfg = self.config
        norm_args = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                         dtype=_dtype(cfg.dtype),
                         param_dtype=_dtype(cfg.param_dtype))
        cache_kv, window, inv_freq = layer_inputs
        cache = None if cache_kv is None else (*cache_kv, *cache_meta)

        attn_out, new_kv = Attention(cfg, self.lora, name="attn")(
            RMSNorm(name="attn_norm", **norm_args)(h),
            positions, valid, cache, window, inv_freq, segments)
        if cfg.post_norms:
            attn_out = RMSNorm(name="attn_post_norm", **norm_args)(attn_out)
        h = h + attn_out

        mlp_out = MLP(cfg, self.lora, name="mlp")(
            RMSNorm(name="mlp_norm", **norm_args)(h))
        if cfg.post_norms:
            mlp_out = RMSNorm(name="mlp_post_norm", **norm_args)(mlp_out)
        return h + mlp_out, new_kv


class Transformer(nn.Module):
    """Decoder-only language model.

    Attributes:
      config: the architecture.
      lora: adapters on the named dense layers, or None for the base model.
        The same base parameters serve both, so the frozen reference policy
        is this module with `lora=None`.
      remat: recompute each layer's activations in the backward pass, which
        trades compute for memory on long sequences.
    """

    config: ModelConfig
    lora: LoRASpec | None = None
    remat: bool = False

    def setup(self):
        cfg = self.config
        pdtype = _dtype(cfg.param_dtype)
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                              param_dtype=pdtype, dtype=_dtype(cfg.dtype))
        block = nn.remat(Block) if self.remat else Block
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast,
                     nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.lora)
        self.final_norm = RMSNorm(
            eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
            dtype=_dtype(cfg.dtype), param_dtype=pdtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense(cfg.vocab_size, dtype=_dtype(cfg.dtype),
                                 param_dtype=pdtype)

    def __call__(self, tokens, positions, valid, cache: KVCache | None = None,
                 segments=None):
        """Run the decoder over new tokens, attending to an optional cache.

        Args:
          tokens: [B, T] int32 token ids.
          positions: [B, T] int32 positions (padding may hold any value).
          valid: [B, T] bool, False for padding.
          cache: earlier tokens' keys and values, batch B.
          segments: optional [B, T] int32 ids that split the new tokens into
            independent continuations of the cache: a token attends to the
            cache and to earlier tokens of its own segment only. Several
            short continuations of one prompt then share one cache row.

        Returns:
          hidden [B, T, D] after the final norm, and a KVCache of the new
          tokens alone ([L, B, T, K, H] keys and values).
        """
        cfg = self.config
        h = self.embed(tokens)  # [B, T, D]
        if cfg.embed_scale:
            h = h * jnp.asarray(math.sqrt(cfg.hidden_size), h.dtype)

        cache_kv = None if cache is None else (cache.k, cache.v)
        cache_meta = None if cache is None else (cache.positions, cache.valid)
        layer_inputs = (
            cache_kv,
            jnp.asarray(cfg.layer_windows()),
            jnp.asarray(cfg.layer_rope_frequencies()),
        )
        h, (k, v) = self.layers(h, layer_inputs, positions, valid, cache_meta,
                                segments)
        new_cache = KVCache(k=k, v=v, positions=positions, valid=valid)
        if self.is_initializing() and not cfg.tie_word_embeddings:
            # `init` runs only this method, and setup submodules create their
            # parameters when first called, so the output layer is touched
            # here or an untied model's tree would lack lm_head.
            self.lm_head(h[:, :1])
        return self.final_norm(h), new_cache

    def unembed(self, hidden):
        """Map final hidden states [..., D] to float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            logits = self.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        return _softcap(logits, self.config.final_logit_softcap)


def positions_from_valid(valid, start=0):
    """Return token positions [B, T] for a left-padded batch.

    Real tokens are numbered from `start` (a scalar or [B] array of cached
    lengths) in order; padding slots get the position of the next real token
    and are masked anyway.
    """
    start = jnp.asarray(start, jnp.int32)
    if start.ndim == 1:
        start = start[:, None]
    return start + jnp.cumsum(valid.astype(jnp.int32), axis=1) - valid.astype(
        jnp.int32)

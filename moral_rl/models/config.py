"""Model hyperparameters for the decoder-only families moral_rl implements.

One frozen dataclass describes Llama (SmolLM2), Gemma2 and Gemma3 text
decoders. The Gemma fields default to Llama behaviour, so a Llama config
only sets the common ones. Configs come from a Hugging Face `config.json`
or from GGUF metadata.
"""

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

ARCHITECTURES = ("llama", "gemma2", "gemma3")

# Hugging Face `model_type` and GGUF `general.architecture` values that map
# onto one of ours.
_ARCHITECTURE_ALIASES = {
    "llama": "llama",
    "mistral": "llama",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyperparameters of a decoder-only transformer.

    Attributes:
      architecture: one of `ARCHITECTURES`.
      vocab_size: number of token embeddings.
      hidden_size: model width D.
      intermediate_size: MLP width F.
      num_layers: number of decoder blocks L.
      num_heads: query heads N.
      num_kv_heads: key/value heads K (grouped-query attention, N % K == 0).
      head_dim: per-head width H (not always D / N in Gemma).
      rope_theta: RoPE base of global-attention layers.
      rope_local_theta: RoPE base of sliding-window layers (Gemma3); None
        means the same as `rope_theta`.
      rope_scaling_factor: linear position scaling of global layers (1.0 is
        none).
      rms_norm_eps: epsilon inside RMSNorm.
      max_position_embeddings: context length in tokens.
      tie_word_embeddings: the output layer reuses the token embeddings.
      mlp_activation: "silu" (SwiGLU, Llama) or "gelu_tanh" (GeGLU, Gemma).
      norm_offset: RMSNorm multiplies by (offset + scale); Gemma stores
        scale - 1, so its offset is 1.0.
      embed_scale: multiply embeddings by sqrt(D) (Gemma).
      post_norms: RMSNorm after attention and MLP too (Gemma2, Gemma3).
      qk_norm: RMSNorm on queries and keys per head (Gemma3).
      query_pre_attn_scalar: attention logits are scaled by
        query_pre_attn_scalar ** -0.5; None means head_dim ** -0.5.
      attn_logit_softcap: tanh soft-capping of attention logits (Gemma2).
      final_logit_softcap: tanh soft-capping of output logits (Gemma2).
      sliding_window: window size in tokens of local layers.
      layer_types: per layer, "global" or "local" attention; None means all
        global.
      dtype: compute dtype name.
      param_dtype: parameter storage dtype name.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    rope_local_theta: float | None = None
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    mlp_activation: str = "silu"
    norm_offset: float = 0.0
    embed_scale: bool = False
    post_norms: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"Unknown architecture {self.architecture!r}; moral_rl "
                f"implements {', '.join(ARCHITECTURES)}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; grouped-query attention "
                "needs whole groups."
            )
        if self.mlp_activation not in ("silu", "gelu_tanh"):
            raise ValueError(
                f"Unknown mlp_activation {self.mlp_activation!r}; use 'silu' "
                "or 'gelu_tanh'."
            )
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(
                    f"Unsupported {field}={getattr(self, field)!r}; use one "
                    f"of {', '.join(_DTYPES)}."
                )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries but "
                    f"the model has {self.num_layers} layers."
                )
            unknown = set(self.layer_types) - {"global", "local"}
            if unknown:
                raise ValueError(
                    f"Unknown layer types {sorted(unknown)}; use 'global' "
                    "or 'local'."
                )
            if "local" in self.layer_types and not self.sliding_window:
                raise ValueError(
                    "Local attention layers need a positive sliding_window."
                )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def layer_windows(self) -> np.ndarray:
        """Return each layer's attention window in tokens, [L] int32.

        Global layers get a window larger than any context, so one masking
        rule serves both kinds of layer inside the layer scan.
        """
        unlimited = np.iinfo(np.int32).max
        types = self.layer_types or ("global",) * self.num_layers
        return np.array(
            [self.sliding_window if t == "local" else unlimited for t in types],
            dtype=np.int32,
        )

    def layer_rope_thetas(self) -> np.ndarray:
        """Return each layer's RoPE base, [L] float32."""
        local_theta = self.rope_local_theta or self.rope_theta
        types = self.layer_types or ("global",) * self.num_layers
        return np.array(
            [local_theta if t == "local" else self.rope_theta for t in types],
            dtype=np.float32,
        )

    def layer_rope_scales(self) -> np.ndarray:
        """Return each layer's linear RoPE position scale, [L] float32."""
        types = self.layer_types or ("global",) * self.num_layers
        return np.array(
            [1.0 if t == "local" else self.rope_scaling_factor for t in types],
            dtype=np.float32,
        )

    def layer_rope_frequencies(self) -> np.ndarray:
        """Return each layer's RoPE inverse frequencies, [L, H/2] float32.

        Frequency i of a layer is theta ** (-2i / H) / scale. The rounding
        steps follow transformers 5.25 (float32 exponent, float32 power and
        reciprocal), so angles agree bit for bit at most frequencies. On
        long prompts gemma-3-270m is sensitive to them: one-ulp differences
        in the frequencies moved its logits at position 807 by 1e-2.
        """
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / (
            np.float32(self.head_dim))
        thetas = self.layer_rope_thetas().astype(np.float64)[:, None]
        powers = (thetas ** exponents.astype(np.float64)).astype(np.float32)
        scales = self.layer_rope_scales()[:, None]
        return (np.float32(1.0) / powers / scales).astype(np.float32)


def canonical_architecture(name: str, *, source: str) -> str:
    """Map a Hugging Face model_type or GGUF architecture to ours."""
    if name not in _ARCHITECTURE_ALIASES:
        raise ValueError(
            f"Unsupported architecture {name!r} in {source}; moral_rl "
            f"implements {', '.join(sorted(_ARCHITECTURE_ALIASES))}."
        )
    return _ARCHITECTURE_ALIASES[name]


def _rope_scaling_factor(rope_scaling: Mapping[str, Any] | None, source: str):
    if not rope_scaling:
        return 1.0
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return 1.0
    if kind != "linear":
        raise ValueError(
            f"Unsupported rope_scaling type {kind!r} in {source}; only "
            "'linear' scaling is implemented."
        )
    return float(rope_scaling["factor"])


def _gemma_layer_types(hf: Mapping[str, Any], architecture: str, n: int):
    """Return the local/global pattern of a Gemma config."""
    if hf.get("layer_types"):
        mapping = {"sliding_attention": "local", "full_attention": "global"}
        return tuple(mapping[t] for t in hf["layer_types"])
    if architecture == "gemma2":
        # Gemma2 alternates, starting with a local layer.
        return tuple("local" if i % 2 == 0 else "global" for i in range(n))
    pattern = int(hf.get("sliding_window_pattern", 6))
    return tuple(
        "global" if (i + 1) % pattern == 0 else "local" for i in range(n)
    )


def _gemma_rope(hf: Mapping[str, Any], architecture: str, source: str):
    """Return the RoPE fields of a Gemma config as ModelConfig fields.

    transformers 5 writes `rope_parameters`, nested by layer type for
    Gemma3 ({"full_attention": {...}, "sliding_attention": {...}}) and flat
    for Gemma2. Older configs have `rope_theta`, `rope_scaling` and, for
    Gemma3, `rope_local_base_freq`. Missing values take the defaults of
    transformers 5.25's Gemma config classes.
    """
    params = hf.get("rope_parameters") or {}
    if architecture == "gemma2":
        full = params if "rope_theta" in params else {}
        local = {}
    else:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
    default_theta = 10_000.0 if architecture == "gemma2" else 1_000_000.0
    fields = dict(
        rope_theta=float(full.get("rope_theta",
                                  hf.get("rope_theta", default_theta))),
        rope_scaling_factor=_rope_scaling_factor(
            full if "rope_type" in full else hf.get("rope_scaling"), source),
    )
    if architecture == "gemma3":
        if _rope_scaling_factor(local, source) != 1.0:
            raise ValueError(
                f"{source} scales the RoPE positions of sliding-window "
                "layers; moral_rl scales only global layers, as Gemma3 does."
            )
        fields["rope_local_theta"] = float(local.get(
            "rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    return fields


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json",
                   **overrides) -> ModelConfig:
    """Build a ModelConfig from the fields of a Hugging Face config.json.

    Args:
      hf: the parsed config.json.
      source: where the config came from, for error messages.
      **overrides: ModelConfig fields to set explicitly (dtypes, say).
    """
    if "text_config" in hf and "model_type" in hf["text_config"]:
        hf = hf["text_config"]
    if "model_type" not in hf:
        raise ValueError(
            f"{source} has no 'model_type'; it does not look like a Hugging "
            "Face model config."
        )
    architecture = canonical_architecture(hf["model_type"], source=source)
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    fields = dict(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rope_theta=float(hf.get("rope_theta", 10_000.0)),
        rope_scaling_factor=_rope_scaling_factor(hf.get("rope_scaling"), source),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    if architecture in ("gemma2", "gemma3"):
        # Absent keys take transformers 5.25's Gemma2Config and
        # Gemma3TextConfig defaults, as transformers itself would.
        gemma2 = architecture == "gemma2"
        activation = hf.get("hidden_activation") or hf.get("hidden_act")
        if activation not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"Unsupported hidden_activation {activation!r} in {source}; "
                "moral_rl implements Gemma's 'gelu_pytorch_tanh' only."
            )
        fields.update(
            mlp_activation="gelu_tanh",
            norm_offset=1.0,
            embed_scale=True,
            post_norms=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attn_logit_softcap=hf.get(
                "attn_logit_softcapping", 50.0 if gemma2 else None),
            final_logit_softcap=hf.get(
                "final_logit_softcapping", 30.0 if gemma2 else None),
            sliding_window=hf.get("sliding_window", 4096),
            layer_types=_gemma_layer_types(
                hf, architecture, fields["num_layers"]),
            **_gemma_rope(hf, architecture, source),
        )
    if architecture == "gemma3":
        if hf.get("use_bidirectional_attention"):
            raise ValueError(
                f"{source} sets use_bidirectional_attention (an embedding "
                "model); moral_rl implements causal Gemma3 decoders only."
            )
        fields.update(qk_norm=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def load_hf_config(folder: str, **overrides) -> ModelConfig:
    """Read `folder/config.json` into a ModelConfig."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No config.json in {folder!r}; a Hugging Face model folder needs "
            "config.json next to its *.safetensors files."
        )
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    return config_from_hf(hf, source=path, **overrides)

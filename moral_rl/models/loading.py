"""Load pretrained weights into the Flax transformer's parameter tree.

Two layouts are read:
  * Hugging Face: a folder (local, or a hub snapshot) with config.json and
    `*.safetensors`, sharded with `model.safetensors.index.json` or not.
  * GGUF: one file with metadata and (possibly quantised) tensors, read and
    dequantised to float32 with the `gguf` package.

Every tensor is checked against the shapes that `ModelConfig` implies, so a
config that disagrees with its checkpoint fails before any compute.
"""

import dataclasses
import functools
import glob
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moral_rl.models import config as config_lib
from moral_rl.models import embedded
from moral_rl.models.transformer import Transformer

# Per-layer tensors: our path inside params["layers"], then the Hugging Face
# and GGUF names with `{i}` for the layer index.
_LAYER_TENSORS = {
    ("attn_norm", "scale"): ("model.layers.{i}.input_layernorm.weight",
                             "blk.{i}.attn_norm.weight"),
    ("attn", "q", "kernel"): ("model.layers.{i}.self_attn.q_proj.weight",
                              "blk.{i}.attn_q.weight"),
    ("attn", "k", "kernel"): ("model.layers.{i}.self_attn.k_proj.weight",
                              "blk.{i}.attn_k.weight"),
    ("attn", "v", "kernel"): ("model.layers.{i}.self_attn.v_proj.weight",
                              "blk.{i}.attn_v.weight"),
    ("attn", "o", "kernel"): ("model.layers.{i}.self_attn.o_proj.weight",
                              "blk.{i}.attn_output.weight"),
    ("mlp", "gate", "kernel"): ("model.layers.{i}.mlp.gate_proj.weight",
                                "blk.{i}.ffn_gate.weight"),
    ("mlp", "up", "kernel"): ("model.layers.{i}.mlp.up_proj.weight",
                              "blk.{i}.ffn_up.weight"),
    ("mlp", "down", "kernel"): ("model.layers.{i}.mlp.down_proj.weight",
                                "blk.{i}.ffn_down.weight"),
}
# Llama has one norm before the MLP, which Hugging Face calls
# post_attention_layernorm. Gemma adds norms after attention and MLP.
_LLAMA_LAYER_TENSORS = {
    ("mlp_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight",
                            "blk.{i}.ffn_norm.weight"),
}
_GEMMA_LAYER_TENSORS = {
    ("attn_post_norm", "scale"): (
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.post_attention_norm.weight"),
    ("mlp_norm", "scale"): ("model.layers.{i}.pre_feedforward_layernorm.weight",
                            "blk.{i}.ffn_norm.weight"),
    ("mlp_post_norm", "scale"): (
        "model.layers.{i}.post_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight"),
}
_QK_NORM_TENSORS = {
    ("attn", "q_norm", "scale"): ("model.layers.{i}.self_attn.q_norm.weight",
                                  "blk.{i}.attn_q_norm.weight"),
    ("attn", "k_norm", "scale"): ("model.layers.{i}.self_attn.k_norm.weight",
                                  "blk.{i}.attn_k_norm.weight"),
}
_TOP_TENSORS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "token_embd.weight"),
    ("final_norm", "scale"): ("model.norm.weight", "output_norm.weight"),
    ("lm_head", "kernel"): ("lm_head.weight", "output.weight"),
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Location of a model's files.

    Attributes:
      kind: "gguf" (one file) or "hf" (a folder with config.json).
      path: the GGUF file or the folder.
      name: what the user passed (an embedded name, path or hub id).
    """

    kind: str
    path: str
    name: str


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.\-]+/[\w.\-]+", source) is not None


def resolve_source(source: str) -> ModelSource:
    """Find a model's files from an embedded name, a path or a hub id.

    Raises:
      FileNotFoundError: nothing matches `source`, with what was tried.
    """
    if source in embedded.EMBEDDED_MODELS:
        return ModelSource("gguf", embedded.embedded_model_path(source), source)
    if os.path.isfile(source):
        if not source.endswith(".gguf"):
            raise ValueError(
                f"{source!r} is a file but not a .gguf file; pass a GGUF file "
                "or a Hugging Face folder with config.json."
            )
        return ModelSource("gguf", source, source)
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return ModelSource("hf", source, source)
        ggufs = sorted(glob.glob(os.path.join(source, "*.gguf")))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], source)
        raise FileNotFoundError(
            f"Folder {source!r} has no config.json and "
            f"{'several' if ggufs else 'no'} .gguf files; pass a Hugging Face "
            "model folder or one GGUF file."
        )
    if _looks_like_hub_id(source) and not source.startswith((".", "/")):
        return ModelSource("hf", _download_from_hub(source), source)
    raise FileNotFoundError(
        f"No model found at {source!r}: it is not an embedded model "
        f"({', '.join(sorted(embedded.EMBEDDED_MODELS))}), not an existing "
        "file or folder, and not a hub id of the form 'org/name'."
    )


def _download_from_hub(repo_id: str) -> str:
    """Return a local snapshot folder of a hub model (cached or fetched)."""
    import huggingface_hub  # transformers depends on it.

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return huggingface_hub.snapshot_download(repo_id,
                                                 allow_patterns=patterns)
    except Exception as err:  # Offline, unknown id, gated model, ...
        raise FileNotFoundError(
            f"Could not get {repo_id!r} from the Hugging Face hub or its "
            f"local cache ({type(err).__name__}: {err}). Check the id, or "
            "download the model and pass its folder."
        ) from err


def expected_param_shapes(config: config_lib.ModelConfig) -> dict:
    """Return the parameter tree of `config` as ShapeDtypeStructs."""
    model = Transformer(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(
        functools.partial(model.init, method=None), jax.random.key(0),
        tokens, tokens, tokens.astype(bool))
    return variables["params"]


def _layer_table(config: config_lib.ModelConfig) -> dict:
    table = dict(_LAYER_TENSORS)
    if config.post_norms:
        table.update(_GEMMA_LAYER_TENSORS)
    else:
        table.update(_LLAMA_LAYER_TENSORS)
    if config.qk_norm:
        table.update(_QK_NORM_TENSORS)
    return table


def _assemble(config, read, layout: int, describe: str) -> dict:
    """Build the parameter tree from a tensor reader.

    Args:
      config: the model config; its shapes are checked.
      read: function (name, kind) -> float32 numpy array in Hugging Face
        orientation ([out, in] for dense weights); kind is "kernel", "norm"
        or "embedding".
      layout: 0 for Hugging Face names, 1 for GGUF names.
      describe: the checkpoint's path, for error messages.
    """
    expected = expected_param_shapes(config)
    pdtype = jnp.dtype(config.param_dtype)

    def convert(array, kind, want, where):
        if kind == "kernel":
            array = array.T
        if tuple(array.shape) != tuple(want.shape):
            raise ValueError(
                f"Tensor {where} in {describe} has shape {array.shape} but "
                f"the config implies {tuple(want.shape)}; the config does not "
                "match this checkpoint."
            )
        return jnp.asarray(array, dtype=pdtype)

    def kind_of(path):
        if path[-1] == "kernel":
            return "kernel"
        return "embedding" if path[-1] == "embedding" else "norm"

    params: dict[str, Any] = {}
    for path, names in _TOP_TENSORS.items():
        if path[0] not in expected:
            continue
        want = expected[path[0]][path[1]]
        array = read(names[layout], kind_of(path))
        params.setdefault(path[0], {})[path[1]] = convert(
            array, kind_of(path), want, names[layout])

    layers: dict[str, Any] = {}
    for path, names in _layer_table(config).items():
        want = expected["layers"]
        for key in path:
            want = want[key]
        per_layer = []
        for i in range(config.num_layers):
            name = names[layout].format(i=i)
            array = read(name, kind_of(path))
            per_layer.append(array.T if kind_of(path) == "kernel" else array)
        stacked = np.stack(per_layer)
        if tuple(stacked.shape) != tuple(want.shape):
            raise ValueError(
                f"Tensors {names[layout]} in {describe} have shape "
                f"{stacked.shape[1:]} but the config implies "
                f"{tuple(want.shape)[1:]}; the config does not match this "
                "checkpoint."
            )
        node = layers
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(stacked, dtype=pdtype)
    params["layers"] = layers
    return params


# --- Hugging Face safetensors ------------------------------------------------


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are missing from {folder}: "
                f"{', '.join(missing)}. Download the whole checkpoint again."
            )
        return [os.path.join(folder, n) for n in files]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors files in {folder}; moral_rl reads Hugging Face "
            "checkpoints in safetensors format only."
        )
    return files


def load_hf_params(folder: str, config: config_lib.ModelConfig) -> dict:
    """Read a Hugging Face safetensors checkpoint into our parameter tree."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in _safetensors_files(folder):
        try:
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"Could not read {path} ({err}); the file is truncated or "
                "not a safetensors file. Download it again."
            ) from err

    def read(name, kind):
        if name not in tensors:
            raise ValueError(
                f"Tensor {name!r} is missing from the checkpoint in {folder}; "
                f"the config's architecture ({config.architecture}) does not "
                "match these weights."
            )
        return np.asarray(tensors[name], dtype=np.float32)

    return _assemble(config, read, layout=0, describe=folder)


# --- GGUF -----------------------------------------------------------------


def open_gguf(path: str):
    """Open a GGUF file, turning a parse failure into a clear error."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf raises ValueError, IndexError, ...
        raise ValueError(
            f"Could not read GGUF file {path} ({type(err).__name__}: {err}); "
            "it is truncated or not a GGUF file. Download or reinstall it."
        ) from err


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, *, source: str, **overrides) -> config_lib.ModelConfig:
    """Build a ModelConfig from GGUF metadata."""
    arch_name = _gguf_field(reader, "general.architecture")
    if arch_name is None:
        raise ValueError(f"{source} has no general.architecture field.")
    architecture = config_lib.canonical_architecture(arch_name, source=source)

    def field(key, default=None):
        value = _gguf_field(reader, f"{arch_name}.{key}", default)
        if value is None:
            raise ValueError(f"{source} lacks the metadata field "
                             f"{arch_name}.{key}.")
        return value

    tokens = _gguf_field(reader, "tokenizer.ggml.tokens") or ()
    hidden = int(field("embedding_length"))
    heads = int(field("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    fields = dict(
        architecture=architecture,
        vocab_size=int(field("vocab_size", len(tokens) or None)),
        hidden_size=hidden,
        intermediate_size=int(field("feed_forward_length")),
        num_layers=int(field("block_count")),
        num_heads=heads,
        num_kv_heads=int(field("attention.head_count_kv", heads)),
        head_dim=int(field("attention.key_length", hidden // heads)),
        rope_theta=float(field("rope.freq_base", 10_000.0)),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    if _gguf_field(reader, f"{arch_name}.rope.scaling.type") == "linear":
        fields["rope_scaling_factor"] = float(field("rope.scaling.factor"))
    if architecture in ("gemma2", "gemma3"):
        hf_like = {
            "model_type": architecture,
            "sliding_window": int(field("attention.sliding_window")),
        }
        fields.update(
            mlp_activation="gelu_tanh", norm_offset=1.0, embed_scale=True,
            post_norms=True,
            # GGUF stores no query scale; Gemma checkpoints below 27B use the
            # head width, which is what llama.cpp assumes too.
            query_pre_attn_scalar=float(fields["head_dim"]),
            attn_logit_softcap=_gguf_field(
                reader, f"{arch_name}.attn_logit_softcapping"),
            final_logit_softcap=_gguf_field(
                reader, f"{arch_name}.final_logit_softcapping"),
            sliding_window=hf_like["sliding_window"],
            layer_types=config_lib._gemma_layer_types(
                hf_like, architecture, fields["num_layers"]),
        )
    if architecture == "gemma3":
        # llama.cpp fixes the local RoPE base of Gemma3 at 10,000.
        fields.update(qk_norm=True, rope_local_theta=10_000.0)
    fields.update(overrides)
    return config_lib.ModelConfig(**fields)


def _undo_rope_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reverse llama.cpp's reordering of Q/K rows for its RoPE layout.

    llama.cpp's converter interleaves the two halves of each head's rows
    (pairs (i, i + H/2) become rows (2i, 2i + 1)); our RoPE rotates the
    half-split layout of Hugging Face checkpoints, so the rows go back.

    Args:
      weight: [heads * H, in] in Hugging Face orientation.
      heads: number of heads these rows belong to.
    """
    rows, cols = weight.shape
    head_dim = rows // heads
    return (weight.reshape(heads, head_dim // 2, 2, cols)
            .swapaxes(1, 2).reshape(rows, cols))


def load_gguf_params(reader, config: config_lib.ModelConfig, *,
                     source: str) -> dict:
    """Dequantise a GGUF file's tensors into our parameter tree."""
    import gguf

    tensors = {t.name: t for t in reader.tensors}

    def read(name, kind):
        if name not in tensors:
            raise ValueError(
                f"Tensor {name!r} is missing from {source}; the file does not "
                f"contain a complete {config.architecture} model."
            )
        tensor = tensors[name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as err:
            raise ValueError(
                f"Could not dequantise {name} ({tensor.tensor_type.name}) in "
                f"{source}: {err}. The file may be truncated."
            ) from err
        # GGUF lists dimensions fastest-first; numpy wants them reversed.
        array = np.asarray(array, np.float32).reshape(
            tuple(int(d) for d in reversed(tensor.shape)))
        if config.architecture == "llama":
            if name.endswith("attn_q.weight"):
                array = _undo_rope_permutation(array, config.num_heads)
            elif name.endswith("attn_k.weight"):
                array = _undo_rope_permutation(array, config.num_kv_heads)
        if config.norm_offset and kind == "norm":
            # llama.cpp's converter stores Gemma norm weights as 1 + w.
            array = array - config.norm_offset
        return array

    return _assemble(config, read, layout=1, describe=source)


# --- Entry point ------------------------------------------------------------


def load_config_and_params(source: ModelSource, **overrides):
    """Return (ModelConfig, params) for a resolved model source.

    Args:
      source: from `resolve_source`.
      **overrides: ModelConfig fields such as dtype="bfloat16".
    """
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        config = gguf_config(reader, source=source.path, **overrides)
        return config, load_gguf_params(reader, config, source=source.path)
    config = config_lib.load_hf_config(source.path, **overrides)
    return config, load_hf_params(source.path, config)

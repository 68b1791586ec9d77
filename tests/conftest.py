"""Shared fixtures for the model tests: the embedded SmolLM2 model, loaded
once per session, and tiny random Llama checkpoints in Hugging Face layout
that carry the embedded model's real tokenizer.
"""

import json
import os
from typing import Any, NamedTuple

import numpy as np
import pytest

# A tiny Llama: 2 layers, width 64, 4 query heads and 2 key/value heads of
# width 16. The vocabulary is the embedded tokenizer's, so its real
# tokenizer files can sit next to the weights.
TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

# Hugging Face name of each per-layer tensor and its [out, in] shape.
_LAYER_SHAPES = {
    "input_layernorm.weight": ("hidden_size",),
    "self_attn.q_proj.weight": ("q_out", "hidden_size"),
    "self_attn.k_proj.weight": ("kv_out", "hidden_size"),
    "self_attn.v_proj.weight": ("kv_out", "hidden_size"),
    "self_attn.o_proj.weight": ("hidden_size", "q_out"),
    "post_attention_layernorm.weight": ("hidden_size",),
    "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
}


class LoadedModel(NamedTuple):
    """A model ready to run: its config, parameters and tokenizer."""

    config: Any
    params: dict
    tokenizer: Any


class TinyCheckpoint(NamedTuple):
    """A tiny model written to disk.

    Attributes:
      folder: the Hugging Face model folder.
      config: the config.json fields.
      tensors: every written tensor by Hugging Face name, [out, in] for
        dense weights.
    """

    folder: str
    config: dict
    tensors: dict


def tiny_llama_tensors(config: dict, seed: int = 0,
                       head_scale: float = 0.02) -> dict:
    """Draw random weights with Hugging Face names and orientation.

    Args:
      config: config.json fields of a Llama model.
      seed: numpy seed.
      head_scale: standard deviation of the output layer (the embeddings
        when tied). Larger values give a peakier next-token distribution.

    Returns:
      Dict from tensor name to float32 array.
    """
    rng = np.random.default_rng(seed)
    sizes = {
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "q_out": config["num_attention_heads"] * config["head_dim"],
        "kv_out": config["num_key_value_heads"] * config["head_dim"],
    }
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    tied = config["tie_word_embeddings"]

    def normal(shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(
        (vocab, hidden), head_scale if tied else 0.02)}
    for i in range(config["num_hidden_layers"]):
        for name, dims in _LAYER_SHAPES.items():
            shape = tuple(sizes[d] for d in dims)
            if name.endswith("layernorm.weight"):
                # Norm scales near 1, but not exactly, so a missing norm
                # would show up in the comparisons.
                value = 1.0 + normal(shape, 0.1)
            else:
                value = normal(shape, 0.1)
            tensors[f"model.layers.{i}.{name}"] = value
    tensors["model.norm.weight"] = 1.0 + normal((hidden,), 0.1)
    if not tied:
        tensors["lm_head.weight"] = normal((vocab, hidden), head_scale)
    return tensors


def write_tiny_llama(folder: str, tokenizer, *, tied: bool = True,
                     shards: int = 1, head_scale: float = 0.02,
                     seed: int = 0) -> TinyCheckpoint:
    """Write a tiny random Llama as a Hugging Face model folder.

    Args:
      folder: created if missing.
      tokenizer: saved next to the weights with `save_pretrained`.
      tied: share the embeddings with the output layer.
      shards: 1 writes model.safetensors; more writes that many shard files
        and model.safetensors.index.json.
      head_scale, seed: see `tiny_llama_tensors`.
    """
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    config = dict(TINY_LLAMA, tie_word_embeddings=tied)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = tiny_llama_tensors(config, seed=seed, head_scale=head_scale)

    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for shard in range(shards):
            filename = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[shard::shards]}
            save_file(part, os.path.join(folder, filename))
            weight_map.update({n: filename for n in part})
        index = {"metadata": {}, "weight_map": weight_map}
        with open(os.path.join(folder, "model.safetensors.index.json"),
                  "w") as f:
            json.dump(index, f, indent=2)

    tokenizer.save_pretrained(folder)
    return TinyCheckpoint(folder=folder, config=config, tensors=tensors)


@pytest.fixture
def tiny_llama_config() -> dict:
    """The config.json fields of the tiny Llama, a fresh copy per test."""
    return dict(TINY_LLAMA)


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory) -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, loaded once (about 10 s).

    Its tokenizer is converted from the GGUF metadata into a temporary
    cache folder, so the user's cache is left alone.
    """
    from moral_rl.models import loading
    from moral_rl.models import tokenizer as tokenizer_lib

    source = loading.resolve_source("smollm2-135m-instruct")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORAL_RL_CACHE",
                     str(tmp_path_factory.mktemp("moral_rl_cache")))
        config, params = loading.load_config_and_params(source)
        tokenizer = tokenizer_lib.load_tokenizer(source)
    return LoadedModel(config=config, params=params, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_factory(embedded_model, tmp_path_factory):
    """Return a function that writes a tiny Llama into a new temp folder.

    It takes the keyword arguments of `write_tiny_llama`, apart from the
    folder and tokenizer. The tokenizer is the embedded model's, so tests
    using it are slow too.
    """
    def make(**kwargs) -> TinyCheckpoint:
        folder = str(tmp_path_factory.mktemp("tiny_llama"))
        return write_tiny_llama(folder, embedded_model.tokenizer, **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_factory) -> TinyCheckpoint:
    """A tiny Llama folder with tied embeddings in one safetensors file."""
    return tiny_llama_factory()

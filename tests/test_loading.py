"""Tests for moral_rl.models.loading: Hugging Face folders (single file,
sharded, hub cache), the embedded GGUF, and clear errors for bad input.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

from moral_rl.models import loading
from moral_rl.models import tokenizer as tokenizer_lib

# Our parameter path inside params["layers"] for each Hugging Face
# per-layer tensor name of a Llama.
LAYER_PATHS = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "q", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o", "kernel"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "mlp.gate_proj.weight": ("mlp", "gate", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down", "kernel"),
}
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def assert_params_equal_tensors(params, checkpoint):
    """Check every loaded array against the written tensor."""
    tensors = checkpoint.tensors
    np.testing.assert_array_equal(params["embed"]["embedding"],
                                  tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"]["scale"],
                                  tensors["model.norm.weight"])
    if checkpoint.config["tie_word_embeddings"]:
        assert "lm_head" not in params
    else:
        np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                      tensors["lm_head.weight"].T)

    for name, path in LAYER_PATHS.items():
        loaded = params["layers"]
        for key in path:
            loaded = loaded[key]
        for i in range(checkpoint.config["num_hidden_layers"]):
            written = tensors[f"model.layers.{i}.{name}"]
            if path[-1] == "kernel":
                written = written.T  # [out, in] -> [in, out]
            np.testing.assert_array_equal(loaded[i], written)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Point the Hugging Face hub cache at tmp_path and forbid downloads.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into module
    constants when it is first imported, which has already happened, so
    the constants are patched as well as the environment.
    """
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.slow
def test_hub_id_loads_cached_snapshot(offline_hub, tiny_llama,
                                      embedded_model):
    repo = offline_hub / "models--org--name"
    snapshot = repo / "snapshots" / SNAPSHOT
    shutil.copytree(tiny_llama.folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)

    source = loading.resolve_source("org/name")
    config, params = loading.load_config_and_params(source)
    tokenizer = tokenizer_lib.load_tokenizer(source)

    assert source.kind == "hf"
    assert os.path.samefile(source.path, snapshot)
    assert config.hidden_size == 64
    assert config.num_kv_heads == 2
    assert_params_equal_tensors(params, tiny_llama)
    text = "Answer with action1 or action2."
    assert tokenizer.encode(text) == embedded_model.tokenizer.encode(text)


@pytest.mark.slow
def test_uncached_hub_id_raises_offline(offline_hub):
    with pytest.raises(FileNotFoundError, match="'org/absent'"):
        loading.resolve_source("org/absent")


@pytest.mark.slow
def test_local_folder_loads_untied_head(tiny_llama_factory):
    checkpoint = tiny_llama_factory(tied=False, seed=1)

    source = loading.resolve_source(checkpoint.folder)
    config, params = loading.load_config_and_params(source)

    assert source == loading.ModelSource("hf", checkpoint.folder,
                                         checkpoint.folder)
    assert not config.tie_word_embeddings
    assert_params_equal_tensors(params, checkpoint)


@pytest.mark.slow
def test_sharded_folder_loads_every_shard(tiny_llama_factory):
    checkpoint = tiny_llama_factory(tied=False, shards=3, seed=2)
    assert len([n for n in os.listdir(checkpoint.folder)
                if n.endswith(".safetensors")]) == 3

    _, params = loading.load_config_and_params(
        loading.resolve_source(checkpoint.folder))

    assert_params_equal_tensors(params, checkpoint)


@pytest.mark.slow
def test_sharded_folder_missing_shard_raises(tiny_llama_factory):
    checkpoint = tiny_llama_factory(shards=2)
    os.remove(os.path.join(checkpoint.folder,
                           "model-00002-of-00002.safetensors"))

    with pytest.raises(FileNotFoundError,
                       match="model-00002-of-00002.safetensors"):
        loading.load_config_and_params(
            loading.resolve_source(checkpoint.folder))


@pytest.mark.slow
def test_embedded_gguf_config_is_smollm2(embedded_model):
    config = embedded_model.config

    assert (config.architecture, config.num_layers) == ("llama", 30)
    assert (config.hidden_size, config.intermediate_size) == (576, 1536)
    assert (config.num_heads, config.num_kv_heads) == (9, 3)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rope_theta == 100000.0
    assert config.max_position_embeddings == 8192


# --- Bad input ---------------------------------------------------------------


def test_missing_folder_raises_with_path(tmp_path):
    missing = str(tmp_path / "no_such_model")

    with pytest.raises(FileNotFoundError, match=re.escape(repr(missing))):
        loading.resolve_source(missing)


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=re.escape(f"{str(tmp_path)!r} has no config.json")):
        loading.resolve_source(str(tmp_path))


def test_truncated_gguf_raises_with_path(tmp_path):
    source_path = loading.resolve_source("smollm2-135m-instruct").path
    truncated = tmp_path / "truncated.gguf"
    with open(source_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))

    source = loading.resolve_source(str(truncated))
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        loading.load_config_and_params(source)


@pytest.mark.slow
def test_truncated_safetensors_raises_with_path(tiny_llama_factory):
    checkpoint = tiny_llama_factory()
    weights = os.path.join(checkpoint.folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)

    with pytest.raises(ValueError, match=re.escape(weights) + ".*truncated"):
        loading.load_config_and_params(loading.resolve_source(checkpoint.folder))


def write_config(folder, fields, **changes):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(fields, **changes), f)


def test_gpt2_model_type_raises(tmp_path, tiny_llama_config):
    write_config(tmp_path, tiny_llama_config, model_type="gpt2")

    with pytest.raises(ValueError, match="Unsupported architecture 'gpt2'"):
        loading.load_config_and_params(loading.resolve_source(str(tmp_path)))


@pytest.mark.slow
def test_hidden_size_mismatch_names_tensor(tiny_llama_factory):
    checkpoint = tiny_llama_factory()
    write_config(checkpoint.folder, checkpoint.config, hidden_size=128)

    with pytest.raises(ValueError,
                       match=r"model\.embed_tokens\.weight .* shape "
                             r"\(49152, 64\) .* implies \(49152, 128\)"):
        loading.load_config_and_params(loading.resolve_source(checkpoint.folder))

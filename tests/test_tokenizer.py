"""Tests for moral_rl.models.tokenizer: the tokenizer converted from GGUF
metadata against the PyTorch reference token ids, its cache folder, and
the stop tokens.
"""

import os

import numpy as np
import pytest

from moral_rl.models import loading
from moral_rl.models import tokenizer as tokenizer_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures",
                       "smollm2_reference_logits.npz")


@pytest.mark.slow
def test_tokens_match_reference_fixture(embedded_model):
    reference = np.load(FIXTURE)
    tokenizer = embedded_model.tokenizer

    # Prompts 0 and 1 went through the chat template, prompt 2 did not.
    for index in (0, 1):
        text = tokenizer_lib.render_chat(
            tokenizer, [{"role": "user", "content": str(reference[f"text_{index}"])}])
        assert tokenizer_lib.encode(tokenizer, text) == (
            reference[f"tokens_{index}"].tolist())
    assert tokenizer_lib.encode(tokenizer, str(reference["text_2"])) == (
        reference["tokens_2"].tolist())


@pytest.mark.slow
def test_gguf_tokenizer_cache_round_trip(tmp_path, monkeypatch,
                                         embedded_model):
    monkeypatch.setenv("MORAL_RL_CACHE", str(tmp_path))
    source = loading.resolve_source("smollm2-135m-instruct")

    converted = tokenizer_lib.load_tokenizer(source)
    entries = os.listdir(tmp_path / "tokenizers")
    cached = tokenizer_lib.load_tokenizer(source)

    assert len(entries) == 1
    assert os.path.isfile(tmp_path / "tokenizers" / entries[0]
                          / "tokenizer_config.json")
    text = "<|im_start|>user\nPick action1 or action2.<|im_end|>\n"
    assert converted.encode(text) == cached.encode(text)
    assert cached.encode(text) == embedded_model.tokenizer.encode(text)
    assert cached.pad_token_id == 2


@pytest.mark.slow
def test_stop_tokens_include_im_end(embedded_model):
    stops = tokenizer_lib.stop_token_ids(embedded_model.tokenizer)

    # <|endoftext|> (id 0) is also SmolLM2's unknown token, which
    # stop_token_ids cannot tell apart from a token missing from the
    # vocabulary, so only <|im_end|> remains.
    assert stops == [2]
    assert embedded_model.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"

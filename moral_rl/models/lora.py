"""Low-rank adapters (LoRA) as a separate pytree over a frozen base model.

An adapter tree mirrors the `lora` collection of `Transformer`: for every
targeted dense layer, `a` [L, in, r] and `b` [L, r, out] (L stacked layers).
Trees made here carry one more leading axis, the adapter axis [A, ...], so
many adapters (seeds, reward types, agents) run over one base model under
`jax.vmap`. B starts at zero, so every adapter equals the base model at
initialisation (Hu et al., "LoRA", 2021).
"""

import jax
import jax.numpy as jnp
import numpy as np

from moral_rl.models.config import ModelConfig
from moral_rl.models.transformer import LoRASpec, Transformer

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def make_lora_spec(rank: int, alpha: float, targets) -> LoRASpec:
    """Validate adapter settings and return a LoRASpec.

    Args:
      rank: inner width r, positive.
      alpha: scale numerator; outputs are scaled by alpha / r.
      targets: "all", or an iterable of names among `ALL_TARGETS`.
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}.")
    if isinstance(targets, str):
        targets = ALL_TARGETS if targets == "all" else tuple(
            t.strip() for t in targets.split(",") if t.strip())
    targets = tuple(targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"Invalid LoRA targets {list(targets)!r}: the model's dense "
            f"layers are {', '.join(ALL_TARGETS)} (or pass 'all')."
        )
    return LoRASpec(rank=int(rank), alpha=float(alpha), targets=targets)


def lora_shapes(config: ModelConfig, spec: LoRASpec) -> dict:
    """Return the adapter tree of one adapter as ShapeDtypeStructs."""
    model = Transformer(config, spec)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens,
                               tokens.astype(bool))
    return variables["lora"]


def init_lora(key, config: ModelConfig, spec: LoRASpec,
              num_adapters: int = 1) -> dict:
    """Draw fresh adapters with a leading adapter axis.

    A is uniform in [-1/sqrt(in), 1/sqrt(in)] (the Kaiming-uniform bound that
    PEFT uses for LoRA A) and B is zero.

    Returns:
      Adapter tree with leaves [num_adapters, L, ...].
    """
    shapes = lora_shapes(config, spec)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    values = []
    for (path, leaf), leaf_key in zip(leaves, keys):
        shape = (num_adapters, *leaf.shape)
        if path[-1].key == "a":
            bound = 1.0 / np.sqrt(leaf.shape[-2])
            values.append(jax.random.uniform(
                leaf_key, shape, leaf.dtype, -bound, bound))
        else:
            values.append(jnp.zeros(shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def select_adapter(lora: dict, index: int) -> dict:
    """Return adapter `index` of a tree with a leading adapter axis."""
    return jax.tree.map(lambda x: x[index], lora)


def merge_lora(params: dict, lora: dict, spec: LoRASpec) -> dict:
    """Fold one adapter into the base weights: W + (alpha / r) A B.

    Args:
      params: base parameters.
      lora: one adapter (no adapter axis), as from `select_adapter`.
      spec: the adapter's LoRASpec.

    Returns:
      New parameters; `Transformer(config)` on them gives the adapted model.
    """
    def merge(node, adapters):
        out = dict(node)
        for name, child in adapters.items():
            if set(child) == {"a", "b"}:
                kernel = node[name]["kernel"]
                delta = jnp.einsum("...ir,...ro->...io", child["a"], child["b"])
                out[name] = {**node[name],
                             "kernel": kernel + spec.scale * delta.astype(
                                 kernel.dtype)}
            else:
                out[name] = merge(node[name], child)
        return out

    return merge(params, lora)


def count_parameters(tree) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def save_lora(directory: str, lora: dict) -> None:
    """Save an adapter tree with orbax (atomic: written then renamed)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, lora)


def load_lora(directory: str, like: dict | None = None) -> dict:
    """Load an adapter tree saved by `save_lora`.

    Args:
      directory: the folder `save_lora` wrote.
      like: optional tree of arrays or ShapeDtypeStructs fixing shapes and
        dtypes.
    """
    import os

    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No saved adapters at {directory!r}.")
    with ocp.StandardCheckpointer() as checkpointer:
        if like is None:
            return checkpointer.restore(directory)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        return checkpointer.restore(directory, abstract)

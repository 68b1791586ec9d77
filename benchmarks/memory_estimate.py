"""Estimate per-device memory of LoRA fine-tuning gemma-2-2b and gemma-2-9b.

Parameter counts come from `jax.eval_shape` of the Flax model, so nothing
is allocated. Activation sizes are an estimate from the tensor shapes that
the backward pass keeps (listed in `activation_bytes`), not a measurement.
The numbers go into docs/memory.md:

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/memory_estimate.py

Set-up (Tennant et al., Moral Alignment for LLM Agents, ICLR 2025, fine-tune
gemma-2-2b-it with LoRA): base weights in bf16 and frozen; rank-64
adapters on every linear layer of every block, kept in fp32 with fp32
gradients and two Adam moments; a batch of 16 prompts x 256 tokens.
"""

import functools

import jax
import jax.numpy as jnp

from moral_rl.models import config as config_lib
from moral_rl.models import loading
from moral_rl.models import lora as lora_lib
from moral_rl.models.transformer import LoRASpec, Transformer

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
GIB = 2 ** 30

# Fields of the models' Hugging Face config.json files.
_GEMMA2_COMMON = dict(
    model_type="gemma2", vocab_size=256_000, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
MODELS = {
    "gemma-2-2b": dict(_GEMMA2_COMMON, hidden_size=2304,
                       intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4),
    "gemma-2-9b": dict(_GEMMA2_COMMON, hidden_size=3584,
                       intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8),
}


def parameter_counts(config: config_lib.ModelConfig, lora_rank: int) -> dict:
    """Count base and adapter parameters with `jax.eval_shape`.

    Returns:
      {"base": base parameters, "lora": adapter parameters}.
    """
    lora = LoRASpec(rank=lora_rank, alpha=float(lora_rank),
                    targets=LORA_TARGETS)
    model = Transformer(config, lora=lora)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(
        functools.partial(model.init, method=None), jax.random.key(0),
        tokens, tokens, tokens.astype(bool))
    base = loading.expected_param_shapes(config)
    return {"base": lora_lib.count_parameters(base),
            "lora": lora_lib.count_parameters(variables["lora"])}


def activation_bytes(config: config_lib.ModelConfig, batch: int,
                     length: int, remat: bool) -> int:
    """Estimate the activations kept for the backward pass, in bytes.

    Per token and layer, in bf16: 8 width-D vectors (block input, two norm
    inputs and outputs, attention and MLP outputs, post-norm outputs), q
    and the attention output (N * H each), k and v (K * H each), and four
    width-F vectors (gate, up, activation, product). Attention logits and
    probabilities are fp32, N * S each. With per-layer remat only each
    block's input is kept, plus one block's tensors while it recomputes.
    Logits over the vocabulary are left out: moral_rl reads them only at
    the few positions of the action tokens.
    """
    d, f = config.hidden_size, config.intermediate_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    per_token = 2 * (8 * d + 2 * n * h + 2 * k * h + 4 * f)
    per_token += 4 * 2 * n * length
    one_layer = batch * length * per_token
    if remat:
        return config.num_layers * batch * length * d * 2 + one_layer
    return config.num_layers * one_layer


def estimate(name: str, devices: int, *, lora_rank: int = 64,
             batch: int = 16, length: int = 256) -> dict:
    """Return per-device memory in bytes for one model and device count.

    Base weights are bf16; adapters, their gradients and the two Adam
    moments are fp32 (16 bytes per adapter parameter). "Replicated" keeps
    a full copy on every device; "sharded" splits weights and optimizer
    state over the devices as FSDP does. The batch is split over devices
    in both cases.
    """
    config = config_lib.config_from_hf(MODELS[name], dtype="bfloat16",
                                       param_dtype="bfloat16")
    counts = parameter_counts(config, lora_rank)
    base = 2 * counts["base"]
    adapters = 16 * counts["lora"]
    local_batch = max(batch // devices, 1)
    return {
        "base_params": counts["base"],
        "lora_params": counts["lora"],
        "base_replicated": base,
        "base_sharded": base / devices,
        "adapters_replicated": adapters,
        "adapters_sharded": adapters / devices,
        "activations": activation_bytes(config, local_batch, length, False),
        "activations_remat": activation_bytes(config, local_batch, length,
                                              True),
    }


def main() -> None:
    print("| model | devices | base bf16 repl. / sharded | adapters + Adam "
          "repl. / sharded | activations / with remat |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        for devices in (1, 8):
            e = estimate(name, devices)
            print(f"| {name} ({e['base_params'] / 1e9:.2f}B, LoRA "
                  f"{e['lora_params'] / 1e6:.1f}M) | {devices} | "
                  f"{e['base_replicated'] / GIB:.2f} / "
                  f"{e['base_sharded'] / GIB:.2f} GiB | "
                  f"{e['adapters_replicated'] / GIB:.2f} / "
                  f"{e['adapters_sharded'] / GIB:.3f} GiB | "
                  f"{e['activations'] / GIB:.2f} / "
                  f"{e['activations_remat'] / GIB:.2f} GiB |")


if __name__ == "__main__":
    main()

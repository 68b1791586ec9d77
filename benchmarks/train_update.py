"""Time the jitted PPO update of the main job and estimate its FLOP/s.

Builds the update of `configs/ipd.py:utilitarian` on the embedded model
(the same code path as `moral_rl.main`), compiles it, and times a few
updates. Model FLOPs are counted analytically from the tokens one update
processes:

  forward, per token:  2 * (non-embedding params + LoRA params)
                       + 4 * L * S * N * H for attention (S = attended keys)
  backward:            2x the forward (activation gradients and LoRA weight
                       gradients; the frozen base weights get none)
  logits:              2 * D * V for each position whose logits are read

An update runs one forward pass over the prompt tree (the rollout) and
epochs * minibatches forward and backward passes.

  python benchmarks/train_update.py [--updates 3] [--peak-gflops 315]
  python benchmarks/train_update.py --history results/<run>/history.json

With --history it also reports the wall time until the policy first
cooperated with probability >= 0.9 in a finished run.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import ipd  # noqa: E402
from moral_rl import learner, run_config, train  # noqa: E402
from moral_rl.models import loading, lora as lora_lib  # noqa: E402


def measure_peak(size=2048, repeats=5):
    """Best fp32 matmul GFLOP/s of a jitted [size, size] product."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / min(times) / 1e9


def update_flops(model_config, lora_params, prompt_set, answers, ppo_config):
    """Analytic model FLOPs of one update (see the module docstring)."""
    cfg = model_config
    embedding = cfg.vocab_size * cfg.hidden_size
    dense = lora_lib.count_parameters(
        loading.expected_param_shapes(cfg)) - embedding
    if not cfg.tie_word_embeddings:
        dense -= embedding
    per_token = 2 * (dense + lora_params)

    attention = 0.0
    context = 0
    for tokens, valid, parent in prompt_set.levels:
        rows, width = tokens.shape
        keys = context + width
        attention += rows * width * 4 * cfg.num_layers * keys * (
            cfg.num_heads * cfg.head_dim)
        context = keys
    num_prompts = len(prompt_set.texts)
    answer_rows = num_prompts * answers.tokens.shape[0]
    answer_tokens = answer_rows * (answers.tokens.shape[1] - 1)
    tokens = prompt_set.num_tokens + answer_tokens
    logits = (num_prompts + answer_tokens) * 2 * cfg.hidden_size * (
        cfg.vocab_size)
    forward = tokens * per_token + attention + logits
    passes = ppo_config.epochs * ppo_config.minibatches
    return forward * (1 + 3 * passes), tokens * (1 + passes)


def time_to_cooperation(history_path, threshold=0.9):
    with open(history_path) as f:
        history = json.load(f)
    elapsed = 0.0
    for record in history:
        elapsed += 1.0 / record["perf/updates_per_sec"]
        if record["policy/p_cooperate"] >= threshold:
            return record["step"], elapsed
    return None, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=3,
                        help="timed updates after the compiling one")
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="matmul peak in GFLOP/s; measured if omitted")
    parser.add_argument("--history", default=None,
                        help="history.json of a finished run")
    args = parser.parse_args()

    config = ipd.get_config("utilitarian")
    run = train.build_run(config)
    state, inputs, step_settings = run.state, run.inputs, run.step_settings
    prompt_set, answers, model_config = (run.prompt_set, run.answers,
                                         run.model_config)
    settings = run_config.validate(config)
    update = jax.jit(lambda s, i: learner.update_step(
        s, i, settings=step_settings), donate_argnums=0)

    start = time.perf_counter()
    state, metrics = update(state, inputs)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.updates):
        start = time.perf_counter()
        state, metrics = update(state, inputs)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    lora_params = lora_lib.count_parameters(
        lora_lib.lora_shapes(model_config, settings.lora))
    flops, tokens = update_flops(model_config, lora_params, prompt_set,
                                 answers, settings.ppo)
    seconds = float(np.median(times))
    peak = args.peak_gflops or measure_peak()
    achieved = flops / seconds / 1e9
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"prompt-tree tokens per pass {prompt_set.num_tokens}, "
          f"LoRA rank {settings.lora.rank} ({lora_params / 1e6:.1f}M params)")
    print(f"first update (with compile) {compile_seconds:.1f} s")
    print(f"update: median {seconds:.1f} s over {len(times)}, "
          f"{1 / seconds:.3f} updates/s, {tokens / seconds:.0f} tokens/s")
    print(f"model FLOPs per update {flops / 1e12:.2f} TFLOP, achieved "
          f"{achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of the "
          f"{peak:.0f} GFLOP/s matmul peak")
    if args.history:
        step, elapsed = time_to_cooperation(args.history)
        print(f"{args.history}: P(C) >= 0.9 first at update {step}, after "
              f"{elapsed:.0f} s of updates")


if __name__ == "__main__":
    main()

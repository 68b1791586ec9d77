"""Measure forward and LoRA training throughput of the embedded SmolLM2.

For each batch size, times two jitted functions on random token batches of
a fixed length (about the token count of an iterated prisoner's dilemma
prompt):

- forward: logits of every position and the mean log-probability of the
  next tokens, with the base model only;
- forward+backward: the gradient of that mean log-probability with respect
  to rank-16 LoRA adapters on all seven dense layers of every block.

The first call compiles and is not counted; the median of the timed calls
is reported. FLOPs are estimated as 2 * N_params per token for the dense
layers, where the tied embeddings count once, as the output layer.
Attention scores and values add 4 * L * T * N * H per token, because the
model computes them over the whole T x T square. Forward+backward counts 3x the
forward FLOPs, the usual convention. Because the base weights are frozen,
their weight gradients are never computed and the real work is nearer 2x,
so the forward+backward utilisation is an upper estimate.

Run from the repository root:

    /work/venv/bin/python benchmarks/model_throughput.py
    /work/venv/bin/python benchmarks/model_throughput.py --peak-gflops 315
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from moral_rl.models import loading
from moral_rl.models import lora as lora_lib
from moral_rl.models.transformer import Transformer, positions_from_valid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import matmul_peak  # noqa: E402  (a sibling script, not a package module)


def mean_next_token_log_prob(model, variables, tokens):
    """Return the mean log-probability of tokens[:, 1:] given their past.

    Args:
      model: the Transformer.
      variables: {"params": ...} and optionally {"lora": ...}.
      tokens: [B, T] int32.

    Returns:
      Scalar float32.
    """
    valid = jnp.ones_like(tokens, bool)
    hidden, _ = model.apply(variables, tokens, positions_from_valid(valid),
                            valid)
    logits = model.apply(variables, hidden[:, :-1],
                         method=Transformer.unembed)  # [B, T-1, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
    return jnp.mean(picked)


def median_seconds(fn, args, repeats):
    """Return the median wall time of `fn(*args)` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def forward_flops(config, num_params, batch, length):
    """Estimate the FLOPs of one forward pass over [batch, length] tokens."""
    dense = 2 * num_params * batch * length
    attention = (4 * config.num_layers * config.num_heads * config.head_dim
                 * batch * length * length)
    return dense + attention


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4,16",
                        help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--length", type=int, default=220,
                        help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per case (default: %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="adapter rank r (default: %(default)s)")
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="fp32 matmul peak in GFLOP/s; measured with "
                             "matmul_peak.py when not given")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main():
    args = parse_args()
    key = jax.random.key(0)

    if args.peak_gflops is None:
        peak = 0.0
        for n in (1024, 2048):
            key, subkey = jax.random.split(key)
            seconds = matmul_peak.time_matmul(subkey, n, jnp.float32, 5)
            peak = max(peak, 2 * n**3 / seconds / 1e9)
    else:
        peak = args.peak_gflops

    config, params = loading.load_config_and_params(
        loading.resolve_source("smollm2-135m-instruct"))
    num_params = lora_lib.count_parameters(params)
    spec = lora_lib.make_lora_spec(args.lora_rank, 2.0 * args.lora_rank, "all")
    key, subkey = jax.random.split(key)
    lora = lora_lib.select_adapter(lora_lib.init_lora(subkey, config, spec), 0)

    base_model = Transformer(config)
    lora_model = Transformer(config, spec)
    forward = jax.jit(lambda p, t: mean_next_token_log_prob(
        base_model, {"params": p}, t))
    backward = jax.jit(jax.grad(lambda a, p, t: mean_next_token_log_prob(
        lora_model, {"params": p, "lora": a}, t)))

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"os.cpu_count() {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"model: {num_params / 1e6:.1f}M parameters, LoRA rank "
          f"{args.lora_rank} on {','.join(spec.targets)} "
          f"({lora_lib.count_parameters(lora) / 1e6:.2f}M), sequence length "
          f"{args.length}, fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"| {'pass':<16} | {'batch':>5} | {'median s':>8} | "
          f"{'tokens/s':>8} | {'GFLOP/s':>7} | {'% of peak':>9} |")
    print(f"|{'-' * 18}|{'-' * 6}:|{'-' * 9}:|{'-' * 9}:|{'-' * 8}:|"
          f"{'-' * 10}:|")

    for batch in args.batch_sizes:
        key, subkey = jax.random.split(key)
        tokens = jax.random.randint(subkey, (batch, args.length), 0,
                                    config.vocab_size, jnp.int32)
        flops = forward_flops(config, num_params, batch, args.length)
        cases = (("forward", forward, (params, tokens), flops),
                 ("forward+backward", backward, (lora, params, tokens),
                  3 * flops))
        for name, fn, fn_args, case_flops in cases:
            seconds = median_seconds(fn, fn_args, args.repeats)
            gflops = case_flops / seconds / 1e9
            print(f"| {name:<16} | {batch:>5} | {seconds:>8.3f} | "
                  f"{batch * args.length / seconds:>8.0f} | {gflops:>7.1f} | "
                  f"{100 * gflops / peak:>8.1f}% |", flush=True)


if __name__ == "__main__":
    main()

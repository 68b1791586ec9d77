"""Measure the achieved FLOP/s of the multi-adapter PPO update.

Builds the main job (`configs/ipd.py:utilitarian`) as a sweep of N agents
with seeds 0..N-1, so N LoRA adapters train over one frozen base model in
one program. The base model is a randomly initialised decoder of a chosen
shape, so no checkpoint is needed. The update is jitted and placed on the
device mesh by `train.jit_update`, the same path a sweep takes, compiled
ahead of time, run once untimed and then timed.

Model FLOPs per agent come from `train_update.update_flops` (rollout
forward pass plus epochs x minibatches forward and backward passes over the
prompt tree), and the update's count is that times N. The optimizer, games
and rewards add no model FLOPs. The achieved rate is compared with the best
rate of a square matmul in the same dtype on the same device.

  # About a minute on a 2-core CPU:
  python benchmarks/adapter_flops.py --shape tiny --adapters 2 --updates 3
  # On one H200 (141 GB), where 8 vmapped adapters need an estimated
  # 77 GiB. XLA_CLIENT_MEM_FRACTION sets the share of GPU memory that
  # JAX's allocator may use (jaxlib 0.10 reads this name; the JAX guide
  # "GPU memory allocation" gives 75% as the initial default):
  XLA_CLIENT_MEM_FRACTION=0.95 python benchmarks/adapter_flops.py \
      --shape gemma2-2b --adapters 8 --out results/adapter_flops.json
  # On an 80 GB GPU, four adapters at a time (an estimated 43 GiB):
  ... --shape gemma2-2b --adapters 8 --adapter_batch 4

The memory figures are estimates from `memory_estimate.activation_bytes`
that the script prints; after compiling it also prints XLA's own buffer
sizes. An update that runs out of memory ends with a message that names
--adapter_batch.

With --out the report is also written as JSON.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import matmul_peak, memory_estimate, train_update  # noqa: E402
from configs import ipd  # noqa: E402
from moral_rl import outputs, run_config, train  # noqa: E402
from moral_rl.models import config as config_lib  # noqa: E402
from moral_rl.models import loading  # noqa: E402
from moral_rl.models import lora as lora_lib  # noqa: E402
from moral_rl.models import tokenizer as tokenizer_lib  # noqa: E402

# Hugging Face config.json fields. gemma2-2b is Gemma2-2B as published:
# width 2304, MLP 9216, 26 layers, 8 query and 4 key/value heads of width
# 256, vocabulary 256,000, window 4096, soft caps 50 and 30 and tied
# embeddings. Its context is 8192 tokens. tiny keeps the Gemma2 layout
# (local and global layers, soft caps, post-norms, GeGLU) at a CPU size,
# with the vocabulary of the SmolLM2 tokenizer.
SHAPES = {
    "gemma2-2b": dict(memory_estimate.MODELS["gemma-2-2b"],
                      max_position_embeddings=8192),
    "tiny": dict(memory_estimate.MODELS["gemma-2-2b"],
                 hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 query_pre_attn_scalar=16, vocab_size=49152,
                 max_position_embeddings=8192),
}
DTYPES = ("bfloat16", "float32")
# Sides of the square matmuls that measure the peak. Large sides saturate
# a GPU, but on a CPU they would take minutes per product.
PEAK_SIZES = {"cpu": (1024, 2048)}
DEFAULT_PEAK_SIZES = (4096, 8192, 16384)
PEAK_REPEATS = 5
GIB = 2 ** 30


def model_config(shape: str, dtype: str) -> config_lib.ModelConfig:
    """Build the ModelConfig of `shape` in `dtype` (weights and compute)."""
    return config_lib.config_from_hf(SHAPES[shape], source=f"--shape {shape}",
                                     dtype=dtype, param_dtype=dtype)


def base_param_count(config: config_lib.ModelConfig) -> int:
    return lora_lib.count_parameters(loading.expected_param_shapes(config))


def random_params(key, config: config_lib.ModelConfig) -> dict:
    """Draw base weights with the architecture's shapes.

    Kernels are normal with std 1/sqrt(fan in), so every layer keeps the
    scale of its input. Embeddings have std 1/sqrt(D): Gemma multiplies
    them by sqrt(D), so the first hidden state has unit scale, and the tied
    output layer gives logits of about unit scale. Norm scales are the
    identity (0 where the model adds an offset of 1).
    """
    shapes = loading.expected_param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(config.param_dtype)
    values = []
    for (path, leaf), leaf_key in zip(leaves, keys):
        name = path[-1].key
        if name == "scale":
            value = jnp.full(leaf.shape, 1.0 - config.norm_offset, dtype)
        else:
            fan_in = (config.hidden_size if name == "embedding"
                      else leaf.shape[-2])
            value = jax.random.normal(leaf_key, leaf.shape, dtype) * (
                jnp.asarray(fan_in ** -0.5, dtype))
        values.append(value)
    return jax.tree_util.tree_unflatten(treedef, values)


def embedded_tokenizer():
    """Load the SmolLM2-135M-Instruct tokenizer that ships with moral_rl.

    Its 49,152 token ids are all below the vocabulary of every shape here
    (Gemma2's has 256,000), so the prompts index valid embeddings. Only
    the prompt lengths matter for FLOPs, not which tokens they are.
    """
    source = loading.resolve_source("smollm2-135m-instruct")
    return tokenizer_lib.load_tokenizer(source)


def benchmark_config(args):
    """The main job's config as a sweep of `args.adapters` seeds."""
    config = ipd.get_config("utilitarian")
    config.sweep.seeds = ",".join(str(seed) for seed in range(args.adapters))
    config.adapter_batch = args.adapter_batch
    config.lora.rank = args.rank
    config.ppo.epochs = args.epochs
    config.num_games = args.games
    config.model.dtype = args.dtype
    config.model.param_dtype = args.dtype
    # Retention probes are read outside the update unless the regulariser
    # is on, so they are not built.
    config.retention.every = 0
    config.retention.text_every = 0
    return config


def device_memory_limit():
    """Bytes that JAX may allocate on the first device, or None if unknown."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("bytes_limit")


def check_state_fits(shape, config, lora_params, num_adapters, limit):
    """Exit when the base weights and adapter states alone exceed `limit`.

    Each adapter keeps its weights, gradients and two Adam moments in the
    parameter dtype. Activations come on top and are checked later.
    """
    if limit is None:
        return
    itemsize = jnp.dtype(config.param_dtype).itemsize
    needed = itemsize * (base_param_count(config)
                         + 4 * lora_params * num_adapters)
    if needed > limit:
        sys.exit(
            f"--shape {shape} with {num_adapters} adapters needs "
            f"{needed / GIB:.1f} GiB for the base weights and adapter states "
            f"alone, but the device {jax.devices()[0].device_kind} has "
            f"{limit / GIB:.1f} GiB; use fewer --adapters, a smaller --rank "
            "or a smaller --shape.")


def warn_activations(config, tokens_per_pass, adapters_in_flight, remat,
                     limit):
    """Print the activation estimate and warn when it exceeds `limit`."""
    # NOTE: the formula treats a pass as one sequence of all its tokens and
    # leaves out the prompt tree's KV caches broadcast to each branch. The
    # real footprint can be higher or lower, so XLA's figures follow.
    per_adapter = memory_estimate.activation_bytes(config, 1, tokens_per_pass,
                                                   remat)
    total = per_adapter * adapters_in_flight
    print(f"estimated activations: {per_adapter / GIB:.1f} GiB per adapter, "
          f"{total / GIB:.1f} GiB for {adapters_in_flight} adapter(s) at once")
    if limit is not None and total > limit:
        print(f"WARNING: the estimate exceeds the device's {limit / GIB:.1f} "
              "GiB; if the update runs out of memory, lower --adapter_batch.")


def measure_peak_gflops(dtype: str) -> float:
    """Best GFLOP/s of a square matmul in `dtype` on the default device."""
    sizes = PEAK_SIZES.get(jax.default_backend(), DEFAULT_PEAK_SIZES)
    key = jax.random.key(0)
    best = 0.0
    for n in sizes:
        key, subkey = jax.random.split(key)
        seconds = matmul_peak.time_matmul(subkey, n, jnp.dtype(dtype),
                                          PEAK_REPEATS)
        best = max(best, 2 * n ** 3 / seconds / 1e9)
    return best


def memory_analysis(compiled) -> dict:
    """XLA's buffer sizes of the compiled update in GiB ({} if unknown)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "temp_size_in_bytes")
    return {field.replace("_in_bytes", "_gib"): getattr(stats, field) / GIB
            for field in fields if hasattr(stats, field)}


def out_of_memory_exit(err, args):
    sys.exit(
        f"The update ran out of device memory at --shape {args.shape}, "
        f"--adapters {args.adapters}, --adapter_batch {args.adapter_batch} "
        f"({type(err).__name__}: {str(err).splitlines()[0]}); lower "
        "--adapter_batch (1 keeps one adapter's activations at a time) or "
        "--adapters.")


def time_update(update, state, inputs, num_updates, args):
    """Compile the update ahead of time, run it once, then time it.

    Returns:
      (compile seconds, list of update seconds, memory analysis dict).
    """
    try:
        start = time.perf_counter()
        compiled = update.lower(state, inputs).compile()
        compile_seconds = time.perf_counter() - start

        state, metrics = compiled(state, inputs)
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(num_updates):
            start = time.perf_counter()
            state, metrics = compiled(state, inputs)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        out_of_memory_exit(err, args)
    failed = np.asarray(metrics["health/failed"])
    if failed.any():
        print(f"WARNING: {int(failed.sum())} agent(s) produced non-finite "
              "values; the timing still holds, but check the init scale.")
    return compile_seconds, times, memory_analysis(compiled)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="architecture of the random base model")
    parser.add_argument("--adapters", type=int, default=4,
                        help="agents (LoRA adapters), seeds 0..N-1")
    parser.add_argument("--adapter_batch", "--adapter-batch", type=int,
                        default=0, help="adapters vmapped together in the "
                        "model calls; 0 means all (config.adapter_batch)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the base weights, adapters and "
                        "compute, and of the peak matmul")
    parser.add_argument("--updates", type=int, default=3,
                        help="timed updates after one untimed update")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank")
    parser.add_argument("--epochs", type=int, default=4,
                        help="PPO epochs per update")
    parser.add_argument("--games", type=int, default=16384,
                        help="games per agent in each update")
    parser.add_argument("--peak-gflops", "--peak_gflops", type=float,
                        default=None, help="matmul peak of one device in "
                        "GFLOP/s; measured in --dtype if omitted")
    parser.add_argument("--out", default=None,
                        help="also write the report to this JSON file")
    args = parser.parse_args(argv)

    for name in ("adapters", "updates", "rank", "epochs", "games"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got "
                         f"{getattr(args, name)}")
    if args.adapter_batch < 0:
        parser.error(f"--adapter_batch must be 0 (all) or positive, got "
                     f"{args.adapter_batch}")
    if args.peak_gflops is not None and not args.peak_gflops > 0:
        parser.error(f"--peak-gflops must be positive, got {args.peak_gflops}")
    return args


def print_report(report):
    print(f"jax {report['jax_version']}, {report['device_kind']} "
          f"({report['backend']}), {report['device_count']} device(s), "
          f"{report['devices_used']} used, dtype {report['dtype']}")
    print(f"shape {report['shape']}: {report['base_params'] / 1e9:.3f}B base "
          f"params; {report['adapters']} adapters of rank "
          f"{report['lora_rank']} ({report['lora_params'] / 1e6:.2f}M params "
          f"each), adapter_batch {report['adapter_batch']}, "
          f"{report['epochs']} epochs, {report['games']} games per agent")
    print(f"compile {report['compile_s']:.1f} s; update: median "
          f"{report['update_s_median']:.3f} s over {report['updates']}")
    print(f"{report['tflop_per_update']:.4g} TFLOP per update "
          f"({report['tflop_per_adapter']:.4g} per adapter), achieved "
          f"{report['achieved_tflops']:.4g} TFLOP/s")
    print(f"{report['dtype']} matmul peak {report['peak_tflops']:.4g} "
          f"TFLOP/s ({report['peak_source']}); share of the peak "
          f"{100 * report['peak_share']:.1f}%")
    if report["xla_memory"]:
        print("XLA buffers (GiB): " + ", ".join(
            f"{name} {value:.2f}" for name, value in
            report["xla_memory"].items()))


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The built run of the benchmark and its analytic FLOP count.

    Attributes:
      config: the run's ConfigDict.
      settings: its validated RunSettings.
      model_config: the random base model's ModelConfig.
      lora_params: parameters of one adapter.
      run: the RunSetup from `train.build_run`.
      flop_per_update: model FLOPs of one update of all adapters.
      tokens_per_update: tokens that one update of all adapters processes.
    """

    config: object
    settings: run_config.RunSettings
    model_config: config_lib.ModelConfig
    lora_params: int
    run: train.RunSetup
    flop_per_update: float
    tokens_per_update: int


def build_benchmark(args) -> Benchmark:
    """Draw the random base model and build the run of `args`."""
    config = benchmark_config(args)
    settings = run_config.validate(config)
    model_cfg = model_config(args.shape, args.dtype)
    lora_params = lora_lib.count_parameters(
        lora_lib.lora_shapes(model_cfg, settings.lora))
    check_state_fits(args.shape, model_cfg, lora_params,
                     settings.num_adapters, device_memory_limit())

    base = train.BaseModel(
        config=model_cfg, params=random_params(jax.random.key(0), model_cfg),
        tokenizer=embedded_tokenizer())
    run = train.build_run(config, settings, model=base)

    # The count is per agent, and every agent runs the same passes.
    flops, tokens = train_update.update_flops(
        model_cfg, lora_params, run.prompt_set, run.answers, settings.ppo)
    return Benchmark(config=config, settings=settings, model_config=model_cfg,
                     lora_params=lora_params, run=run,
                     flop_per_update=flops * settings.num_adapters,
                     tokens_per_update=tokens * settings.num_adapters)


def main(argv=None) -> dict:
    """Run the benchmark; return the report that it prints."""
    args = parse_args(argv)
    bench = build_benchmark(args)
    config, settings, run = bench.config, bench.settings, bench.run
    num_adapters = settings.num_adapters

    passes = 1 + settings.ppo.epochs * settings.ppo.minibatches
    warn_activations(bench.model_config,
                     bench.tokens_per_update // (num_adapters * passes),
                     min(args.adapter_batch or num_adapters, num_adapters),
                     config.model.remat, device_memory_limit())

    mesh = train.make_mesh(config.mesh)
    update, state, inputs = train.jit_update(run.step_settings, mesh,
                                             run.state, run.inputs,
                                             population=False)
    compile_seconds, times, xla_memory = time_update(update, state, inputs,
                                                     args.updates, args)

    seconds = float(np.median(times))
    peak_source = "given" if args.peak_gflops else "measured"
    peak_gflops = args.peak_gflops or measure_peak_gflops(args.dtype)
    achieved_tflops = bench.flop_per_update / seconds / 1e12
    report = {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "devices_used": int(mesh.devices.size),
        "load_average": os.getloadavg()[0],
        "shape": args.shape,
        "dtype": args.dtype,
        "base_params": base_param_count(bench.model_config),
        "adapters": num_adapters,
        "adapter_batch": args.adapter_batch,
        "lora_rank": args.rank,
        "lora_params": bench.lora_params,
        "epochs": args.epochs,
        "games": args.games,
        "updates": len(times),
        "tokens_per_update": bench.tokens_per_update,
        "compile_s": compile_seconds,
        "update_s_median": seconds,
        "update_s": times,
        "flop_per_update": bench.flop_per_update,
        "tflop_per_update": bench.flop_per_update / 1e12,
        "tflop_per_adapter": bench.flop_per_update / num_adapters / 1e12,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak_gflops / 1e3,
        "peak_source": peak_source,
        "peak_share": achieved_tflops / (peak_gflops / 1e3),
        "xla_memory": xla_memory,
    }
    print_report(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        outputs.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

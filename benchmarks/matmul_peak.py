"""Measure the practical matmul throughput of this machine's CPU with JAX.

Times jitted square matmuls C = A @ B for several sizes n and dtypes, counts
2 * n**3 floating-point operations per matmul, and prints the median
GFLOP/s per case and the best value per dtype. The best fp32 value is the
denominator for the achieved-FLOP/s figures reported elsewhere.

Run from the repository root:

    /work/venv/bin/python benchmarks/matmul_peak.py
    /work/venv/bin/python benchmarks/matmul_peak.py --sizes 512,1024 --repeats 3

Other processes on a shared machine lower the numbers, so run it when the
machine is otherwise idle, or report the load next to the result.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    # [N, K] @ [K, M] -> [N, M]
    return jnp.einsum("NK,KM->NM", a, b)


def time_matmul(key: jax.Array, n: int, dtype, repeats: int) -> float:
    """Time one jitted n x n matmul.

    The first call compiles and warms the caches and is not counted.

    Args:
        key: PRNG key for the random operands.
        n: side of the square matrices.
        dtype: element type of both operands and of the result.
        repeats: number of timed calls.

    Returns:
        The median wall time of one call, in seconds.
    """
    key, subkey_a, subkey_b = jax.random.split(key, 3)
    a = jax.random.normal(subkey_a, (n, n), dtype=dtype)
    b = jax.random.normal(subkey_b, (n, n), dtype=dtype)
    compiled = jax.jit(matmul)

    jax.block_until_ready(compiled(a, b))

    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(a, b))
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="512,1024,2048,4096",
        help="comma-separated matrix sides n (default: %(default)s)",
    )
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help=f"comma-separated dtypes out of {sorted(DTYPES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed calls per case; the median is reported (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for the operands")
    args = parser.parse_args()

    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.dtypes = args.dtypes.split(",")
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main() -> None:
    args = parse_args()
    key = jax.random.key(args.seed)

    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}, os.cpu_count() {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'dtype':>9} {'n':>6} {'median s':>10} {'GFLOP/s':>9}")

    best = {}
    for name in args.dtypes:
        for n in args.sizes:
            key, subkey = jax.random.split(key)
            seconds = time_matmul(subkey, n, DTYPES[name], args.repeats)
            gflops = 2 * n**3 / seconds / 1e9
            best[name] = max(best.get(name, 0.0), gflops)
            print(f"{name:>9} {n:>6} {seconds:>10.4f} {gflops:>9.1f}")

    for name, gflops in best.items():
        print(f"best {name}: {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()

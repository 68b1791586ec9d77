"""Measure game-steps per second of the jitted iterated-game step on CPU.

One game-step is one round of one game: O's action, the env transition and
M's moral reward. M's actions come from a fixed distribution (45% C, 45% D,
10% illegal). The rounds run in `jax.lax.scan` to amortise dispatch. One
threefry word per game and round supplies a byte for M's action and a byte
for O's uniform draw. Drawing the words for blocks of 2 to 100 rounds at
once measured slower on a 2-core CPU (jax 0.10.2). The likely cause is that
the block is written to memory and read back.

Run: PYTHONPATH=$PWD /work/venv/bin/python benchmarks/env_throughput.py
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from moral_rl import games

# Byte thresholds for M's action: C below 115, D below 230, else illegal,
# i.e. about 45% C, 45% D and 10% illegal.
_M_COOPERATE_BELOW = 115
_M_DEFECT_BELOW = 230


def _play_round(states, total_reward, byte_m, byte_o, params):
    """Play one round in every game.

    The byte arrays are uint32 [N] with values in [0, 256).
    """
    action_m = jnp.where(
        byte_m < _M_COOPERATE_BELOW,
        games.COOPERATE,
        jnp.where(byte_m < _M_DEFECT_BELOW, games.DEFECT, games.ILLEGAL),
    ).astype(jnp.int32)
    uniform_o = byte_o.astype(jnp.float32) * (1.0 / 256.0)

    action_o = jax.vmap(games.opponent_action_from_uniform, (0, 0, None))(
        uniform_o, states, params.opponent
    )
    reward = jax.vmap(games.moral_reward, (0, 0, 0, None, None))(
        action_m, action_o, states.prev_action_o, params.payoffs, params.reward
    )
    states, _ = jax.vmap(games.step_actions, (0, 0, 0, None))(
        states, action_m, action_o, params
    )
    return states, total_reward + reward


@functools.partial(jax.jit, static_argnames=("num_games", "num_rounds"))
def run_games(key, params, num_games, num_rounds):
    """Reset `num_games` games and play `num_rounds` rounds.

    Returns:
      (final states, float32 [num_games] summed rewards of M).
    """
    key, subkey = jax.random.split(key)
    states = jax.vmap(games.reset, (0, None))(
        jax.random.split(subkey, num_games), params
    )
    total_reward = jnp.zeros((num_games,), jnp.float32)

    def play(carry, round_key):
        states, total_reward = carry
        word = jax.random.bits(round_key, (num_games,), jnp.uint32)  # [N]
        byte_m = word & 0xFF
        byte_o = (word >> 8) & 0xFF
        return _play_round(states, total_reward, byte_m, byte_o, params), None

    round_keys = jax.random.split(key, num_rounds)
    (states, total_reward), _ = jax.lax.scan(
        play, (states, total_reward), round_keys
    )
    return states, total_reward


def measure(num_games, num_rounds, repeats, params):
    """Return the best game-steps per second over `repeats` timed runs."""
    key = jax.random.key(0)
    jax.block_until_ready(run_games(key, params, num_games, num_rounds))

    best = 0.0
    for repeat in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(
            run_games(
                jax.random.fold_in(key, repeat + 1),
                params,
                num_games,
                num_rounds,
            )
        )
        elapsed = time.perf_counter() - start
        best = max(best, num_games * num_rounds / elapsed)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--num-games",
        type=int,
        nargs="+",
        default=[1_000, 100_000, 1_000_000],
        help="numbers of parallel games to measure",
    )
    parser.add_argument(
        "--num-rounds", type=int, default=100, help="rounds per game"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per size; the best is reported",
    )
    parser.add_argument(
        "--opponent",
        default="generous_tit_for_tat",
        help="opponent name, see games.OPPONENT_KINDS",
    )
    parser.add_argument(
        "--reward",
        default="game_deontological",
        help="reward name, see games.REWARDS",
    )
    args = parser.parse_args()
    params = games.make_env_params(
        "prisoners_dilemma", args.opponent, args.reward
    )
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{args.num_rounds} rounds, opponent {args.opponent}, "
        f"reward {args.reward}"
    )
    print(f"| parallel games | game-steps/s |")
    print(f"| ---: | ---: |")
    for num_games in args.num_games:
        rate = measure(num_games, args.num_rounds, args.repeats, params)
        print(f"| {num_games:,} | {rate:.3g} |", flush=True)


if __name__ == "__main__":
    main()

"""Compare a sharded update on 8 simulated CPU devices with one device.

Run by tests/test_multi_agent.py in a fresh process, because the device
count must be set before JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/sharded_update.py TINY_MODEL_FOLDER

Prints one JSON line with the largest differences.
"""

import json
import sys

import jax
import numpy as np

from configs import ipd
from moral_rl import learner, train


def main(folder):
    config = ipd.get_config("utilitarian,smoke")
    config.model.name = folder
    config.lora.rank = 2
    config.sweep.seeds = "0,1"
    config.ppo.reward_norm = False
    config.ppo.reward_scaling = False
    config.mesh.adapter, config.mesh.data, config.mesh.model = 2, 2, 2
    run = train.build_run(config)
    initial = np.asarray(
        run.state.agents.adapter["lora"]["layers"]["attn"]["q"]["b"])

    # One device, no shardings.
    single = jax.jit(lambda s, i: learner.update_step(
        s, i, settings=run.step_settings))
    state_1, inputs_1 = run.state, run.inputs
    for _ in range(2):
        state_1, metrics_1 = single(state_1, inputs_1)

    # Eight devices: adapters x games x FSDP-sharded base weights.
    mesh = train.make_mesh(config.mesh)
    update, state_8, inputs_8 = train.jit_update(
        run.step_settings, mesh, run.state, run.inputs, population=False)
    for _ in range(2):
        state_8, metrics_8 = update(state_8, inputs_8)
    sharded_leaf = jax.tree.leaves(inputs_8.base_params)[0]

    metric_difference = max(
        float(np.max(np.abs(np.asarray(metrics_1[name])
                            - np.asarray(metrics_8[name]))))
        for name in metrics_1)
    adapter_difference = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(state_1.agents.adapter),
                        jax.tree.leaves(state_8.agents.adapter)))
    final = np.asarray(
        state_8.agents.adapter["lora"]["layers"]["attn"]["q"]["b"])
    print(json.dumps({
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "base_sharding": str(sharded_leaf.sharding.spec),
        "max_metric_difference": metric_difference,
        "max_adapter_difference": adapter_difference,
        "adapters_moved": bool(np.abs(final - initial).max() > 0),
    }))


if __name__ == "__main__":
    main(sys.argv[1])

"""Capability retention at a high learning rate, with and without the
retention regulariser.

The main job (`configs/ipd.py`: Utilitarian reward against Tit-for-Tat) at
LoRA rank 16 and learning rate 1e-3, ten times the main job's rate, for a
handful of updates. At this rate plain PPO is expected to rewrite the
model's answers outside the game; the `regularised` switch adds the probe
KL and PPO-ptx terms of `moral_rl/retention.py` to the PPO loss. Probe
metrics are logged every update and the greedy answers every 3.

  python -m moral_rl.main --config=configs/retention.py
  python -m moral_rl.main --config=configs/retention.py:regularised
  python -m moral_rl.main --config=configs/retention.py:regularised,smoke

Other switches are those of `configs/ipd.py` (reward, opponent, game,
smoke). See docs/retention.md for reading the metrics.
"""

from configs import ipd

# Tuned on the embedded model at this config's learning rate (see
# docs/retention.md). At the optimum of kl_coef * KL - ptx_coef * log p(y),
# each reference token y gains about (ptx_coef / kl_coef) / p(y) nats of
# logit over the base model: at least 1/3 nat with these values. That
# margin protects the near-ties in the base model's greedy answers, which
# flip first, and costs little KL. The larger kl_coef resists the rest of
# the drift that PPO causes. Measured alternatives: kl 1.0 with ptx 0.1
# kept the KL small but let 17% of the answers change. kl 1.0 with ptx 1.0
# kept 93% of the answers but raised the KL to 0.34 by update 2.
KL_COEF = 3.0
PTX_COEF = 1.0


def get_config(arg=None):
    tokens = [t for t in (arg or "").split(",") if t]
    regularised = "regularised" in tokens
    rest = [t for t in tokens if t != "regularised"]
    config = ipd.get_config(",".join(rest) or "utilitarian,tit_for_tat")

    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.optimizer.learning_rate = 1e-3
    config.num_updates = 6
    config.figure_every = 3
    config.checkpoint_every = 3
    config.retention.every = 1
    config.retention.text_every = 3
    if regularised:
        config.retention.kl_coef = KL_COEF
        config.retention.ptx_coef = PTX_COEF
        config.run_name = "retention__regularised"
    else:
        config.run_name = "retention__plain"
    if "smoke" in rest:
        config.num_updates = 3
        config.lora.rank = 4
        config.lora.alpha = 8.0
    return config

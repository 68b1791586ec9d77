"""Unlearning: selfish training first, then a moral reward.

Tennant et al. ("Moral Alignment for LLM Agents", ICLR 2025) train 500
episodes with the Game reward and then 500 with the Deontological or
Utilitarian reward, and find that the agent moves from defection to
cooperation. This config keeps everything of `configs/ipd.py` and runs the
Game reward for the first half of the updates, then the moral reward named
after the colon:

  python -m moral_rl.main --config=configs/unlearning.py:utilitarian
  python -m moral_rl.main --config=configs/unlearning.py:deontological,smoke

The switch update is `num_updates // 2` (12 of 24 by default), marked by a
dashed line in the action-type figure.
"""

from configs import ipd


def get_config(arg=None):
    config = ipd.get_config(arg or "utilitarian")
    moral_reward = config.reward
    config.num_updates = 2 * config.num_updates
    config.reward_schedule = (
        f"game:{config.num_updates // 2},{moral_reward}")
    return config

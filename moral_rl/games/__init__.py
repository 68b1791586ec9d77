"""Iterated 2x2 social-dilemma games, opponents, moral rewards and metrics.

All functions are pure JAX and written for one game; vmap them over games.
Actions are int32: COOPERATE = 0, DEFECT = 1, ILLEGAL = 2.
"""

# Actions and payoff tables.
from moral_rl.games.payoffs import COOPERATE
from moral_rl.games.payoffs import DEFECT
from moral_rl.games.payoffs import GAMES
from moral_rl.games.payoffs import Game
from moral_rl.games.payoffs import ILLEGAL
from moral_rl.games.payoffs import get_game
from moral_rl.games.payoffs import make_game
from moral_rl.games.payoffs import player_payoffs
from moral_rl.games.payoffs import round_payoffs

# Environment.
from moral_rl.games.env import EnvParams
from moral_rl.games.env import GameState
from moral_rl.games.env import make_env_params
from moral_rl.games.env import reset
from moral_rl.games.env import step
from moral_rl.games.env import step_actions

# Opponents.
from moral_rl.games.opponents import OPPONENT_KINDS
from moral_rl.games.opponents import OpponentParams
from moral_rl.games.opponents import cooperation_probability
from moral_rl.games.opponents import make_opponent
from moral_rl.games.opponents import opponent_action
from moral_rl.games.opponents import opponent_action_from_uniform

# Moral rewards.
from moral_rl.games.rewards import BASE_REWARD_FNS
from moral_rl.games.rewards import BASE_REWARDS
from moral_rl.games.rewards import REWARDS
from moral_rl.games.rewards import RewardParams
from moral_rl.games.rewards import base_rewards
from moral_rl.games.rewards import deontological_reward
from moral_rl.games.rewards import game_reward
from moral_rl.games.rewards import is_legal
from moral_rl.games.rewards import make_reward
from moral_rl.games.rewards import maximin_reward
from moral_rl.games.rewards import moral_reward
from moral_rl.games.rewards import utilitarian_reward
from moral_rl.games.rewards import virtue_equality_reward
from moral_rl.games.rewards import virtue_kindness_reward

# Metrics.
from moral_rl.games.metrics import ACTION_TYPES
from moral_rl.games.metrics import StepMetrics
from moral_rl.games.metrics import action_type
from moral_rl.games.metrics import aggregate_metrics
from moral_rl.games.metrics import deontological_regret
from moral_rl.games.metrics import step_metrics
from moral_rl.games.metrics import utilitarian_regret

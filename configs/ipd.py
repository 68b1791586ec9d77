"""Moral fine-tuning in the iterated Prisoner's Dilemma (the main job).

The config argument after the colon names the experiment, comma-separated:
a reward (game, deontological, utilitarian, game_deontological, ...), an
opponent (tit_for_tat, random, always_cooperate, always_defect, ...), a game
(prisoners_dilemma, stag_hunt, ...), and `smoke` for a tiny CPU test run.
Any field can still be overridden with --config.<field>=<value>.

Launch, from the repository root:

  python -m moral_rl.main --config=configs/ipd.py:utilitarian
  python -m moral_rl.main --config=configs/ipd.py:game,random \
      --config.ppo.epochs=2 --workdir=results/game_vs_random
  python -m moral_rl.main --config=configs/ipd.py:utilitarian,smoke

Defaults that come from Tennant et al., "Moral Alignment for LLM Agents"
(ICLR 2025) say so; the others are sized so that the run on the embedded
SmolLM2-135M-Instruct finishes on a 2-core CPU in about eight minutes.
"""

import ml_collections

from moral_rl.games import opponents, payoffs, rewards


def parse_arg(arg):
    """Split 'utilitarian,random,smoke' into config switches."""
    switches = {"reward": "utilitarian", "opponent": "tit_for_tat",
                "game": "prisoners_dilemma", "smoke": False}
    for token in filter(None, (arg or "").split(",")):
        if token in rewards.REWARDS:
            switches["reward"] = token
        elif token in opponents.OPPONENT_KINDS:
            switches["opponent"] = token
        elif token in payoffs.GAMES:
            switches["game"] = token
        elif token == "smoke":
            switches["smoke"] = True
        else:
            raise ValueError(
                f"Unknown config switch {token!r}; use a reward "
                f"({', '.join(rewards.REWARDS)}), an opponent "
                f"({', '.join(opponents.OPPONENT_KINDS)}), a game "
                f"({', '.join(payoffs.GAMES)}) or 'smoke'.")
    return switches


def get_config(arg=None):
    switches = parse_arg(arg)
    config = ml_collections.ConfigDict()

    config.seed = 0  # PRNG seed of the agent (of every agent without sweep).
    config.run_name = ""  # Empty: <game>__<reward>__<opponent>__seed<seed>.

    # The game and the agent's moral reward.
    config.game = switches["game"]
    config.opponent = switches["opponent"]
    config.reward = switches["reward"]
    # Optional phases "name:updates,...,name" (the last runs to the end);
    # empty means `reward` throughout. "game:500,utilitarian" is the paper's
    # unlearning experiment.
    config.reward_schedule = ""
    config.xi = 3.0  # Deontological penalty (paper: 3).
    config.r_illegal = -6.0  # Reward for an illegal answer (paper: -6).
    config.action_strings = "action1,action2"  # C, D (paper's training pair).
    config.prompt_template = "standard"
    config.system_prompt = ""  # Optional system text before the game prompt.

    # Model: an embedded name, a GGUF file, a Hugging Face folder or hub id.
    config.model = ml_collections.ConfigDict()
    config.model.name = "smollm2-135m-instruct"
    config.model.dtype = "float32"  # Compute dtype: float32 or bfloat16.
    config.model.param_dtype = "float32"  # Storage dtype of base weights.
    config.model.remat = False  # Recompute layer activations in backward.

    # LoRA adapters on all linear layers (paper: rank 64, alpha 32; the
    # paper's dropout 0.05 is not implemented).
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 64
    config.lora.alpha = 32.0
    config.lora.targets = "all"

    # Batch: B games per agent, each update plays `rollout_length` rounds.
    config.num_games = 16384
    config.rollout_length = 1
    config.num_updates = 12

    # Sweeps: every combination is one adapter of the same program, and
    # agent i computes exactly what a one-agent run with its seed, reward
    # and opponent computes. Empty fields keep the single value above.
    config.sweep = ml_collections.ConfigDict()
    config.sweep.seeds = ""  # As "0,1,2".
    # Rewards or schedules separated by ";", as
    # "game;utilitarian;game:6,deontological".
    config.sweep.rewards = ""
    config.sweep.opponents = ""  # As "tit_for_tat,random".

    # Learning opponents: one population per seed, one member per reward
    # (";"-separated, an even number); members play each other and each
    # learns from its own reward. Two members are the paper's LLM-vs-LLM
    # setting. Matching: "fixed" pairs (0, 1), (2, 3), ...; "round_robin"
    # cycles through all pairs; "random" redraws the pairs every update.
    config.population = ml_collections.ConfigDict()
    config.population.rewards = ""
    config.population.matching = "fixed"

    # Adapters vmapped together in the model calls; 0 means all. Smaller
    # values run chunks one after another and need less memory.
    config.adapter_batch = 0

    # PPO (see moral_rl.ppo.PPOConfig for each field's source).
    config.ppo = ml_collections.ConfigDict()
    config.ppo.clip_eps = 0.2
    config.ppo.value_clip_eps = 0.2
    config.ppo.value_coef = 0.1
    config.ppo.entropy_coef = 0.0
    config.ppo.epochs = 4  # Paper (TRL default): 4.
    config.ppo.minibatches = 1
    config.ppo.discount = 0.0  # Paper: each round is a one-step episode.
    config.ppo.gae_lambda = 0.95
    config.ppo.whiten_advantages = True
    # Paper: adaptive KL control from 0.2. With exact distributions the
    # per-sample penalty holds the C:D odds near the base model's, and
    # against Tit-for-Tat the Game reward favours D by one point only, a
    # third of a standard deviation once illegal answers are in the reward
    # statistics. At 0.2 the Game agent stalled at 70% defection in 12
    # updates; 0.05 lets every reward reach its target in this budget.
    config.ppo.kl_initial = 0.05
    config.ppo.kl_target = 6.0  # TRL's default target.
    config.ppo.kl_horizon = 2000  # In updates; TRL's rate per PPO step.
    config.ppo.reward_scaling = True  # Paper: on.
    config.ppo.reward_norm = True  # Paper: on.
    config.ppo.reward_clip = ml_collections.FieldReference(None,
                                                           field_type=float)

    # Adam with gradient clipping. The paper's 1.41e-5 needs about 1000
    # updates; exact action distributions let 1e-4 converge in tens of
    # updates while keeping the model's chat answers intact.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.schedule = "constant"  # constant, cosine or linear.
    config.optimizer.warmup_updates = 0
    config.optimizer.max_grad_norm = 1.0
    config.optimizer.grad_accum_steps = 1

    # Devices: a mesh of adapter x data x model devices. Agents are split
    # over `adapter`, each agent's games over `data`, and with model > 1 the
    # base weights are sharded FSDP-style over `model` (gathered per layer
    # by XLA) instead of replicated.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.adapter = 1
    config.mesh.data = 1
    config.mesh.model = 1

    # Capability retention (moral_rl/retention.py, docs/retention.md):
    # probe prompts outside the game, answered greedily by the base model.
    config.retention = ml_collections.ConfigDict()
    config.retention.probes_file = ""  # JSON probes; empty: the shipped set.
    config.retention.num_probes = 0  # Use the first N probes; 0: all.
    config.retention.max_new_tokens = 32  # Length of the reference answers.
    config.retention.every = 4  # Updates between probe metrics; 0: off.
    config.retention.text_every = 12  # Updates between answer texts; 0: off.
    # Regulariser weights; 0 and 0 train exactly as the paper's method.
    config.retention.kl_coef = 0.0  # Probe KL(adapter || base), nats.
    config.retention.ptx_coef = 0.0  # NLL of the base model's answers.

    config.log_every = 1  # Updates between metric records.
    config.figure_every = 4  # Updates between action-type figures.
    config.checkpoint_every = 4  # Updates between checkpoints.
    config.keep_checkpoints = 2

    if switches["smoke"]:
        config.num_games = 64
        config.num_updates = 3
        config.lora.rank = 4
        config.lora.alpha = 8.0
        config.ppo.epochs = 1
        config.figure_every = 2
        config.checkpoint_every = 2
    return config

"""Config checks that run before any model loads.

Pins: each invalid field raises ValueError naming config.<field>; reward
schedules parse into phases; train_and_evaluate rejects a bad config without
touching the model loader.
"""

import pytest

from configs import ipd, unlearning
from moral_rl import run_config, train
from moral_rl.models import loading


def _config(**changes):
    config = ipd.get_config("utilitarian")
    for path, value in changes.items():
        node = config
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_default_config_is_valid():
    settings = run_config.validate(_config())

    assert settings.reward_phases == ((0, "utilitarian"),)
    assert settings.action_strings == ("action1", "action2")
    assert settings.ppo.epochs == 4


@pytest.mark.parametrize("field, value, message", [
    ("reward", "kindness", "config.reward='kindness'"),
    ("opponent", "tft", "config.opponent='tft'"),
    ("game", "chess", "config.game='chess'"),
    ("num_games", 0, "config.num_games=0"),
    ("rollout_length", 0, "config.rollout_length=0"),
    ("optimizer.learning_rate", -1e-4, "config.optimizer.learning_rate"),
    ("optimizer.schedule", "step", "config.optimizer.schedule='step'"),
    ("ppo.minibatches", 3, "config.ppo.minibatches=3"),
    ("ppo.epochs", 0, "PPOConfig.epochs=0"),
    ("ppo.discount", 1.5, "PPOConfig.discount=1.5"),
    ("lora.targets", "qkv", "qkv"),
    ("action_strings", "action1", "config.action_strings"),
    ("reward_schedule", "game,utilitarian", "config.reward_schedule"),
    ("reward_schedule", "game:0,utilitarian", "config.reward_schedule"),
    ("reward_schedule", "game:5,altruism", "config.reward_schedule='altruism'"),
    ("mesh.adapter", 2, "config.mesh.adapter=2"),
])
def test_invalid_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")
                       .replace("(", r"\(")):
        run_config.validate(_config(**{field: value}))


def test_wrong_type_override_names_field():
    config = ipd.get_config("utilitarian")

    with pytest.raises(TypeError, match="num_updates"):
        config.num_updates = "ten"


def test_reward_schedule_phases():
    phases = run_config.parse_reward_schedule("game:5,deontological:3,"
                                              "utilitarian", "game")

    assert phases == ((0, "game"), (5, "deontological"), (8, "utilitarian"))


def test_config_switches_parse():
    config = ipd.get_config("game,random,stag_hunt,smoke")

    assert config.reward == "game"
    assert config.opponent == "random"
    assert config.game == "stag_hunt"
    assert config.num_games == 64


def test_unknown_config_switch_raises():
    with pytest.raises(ValueError, match="'altruism'"):
        ipd.get_config("altruism")


def test_bad_config_fails_before_model_loads(tmp_path, monkeypatch):
    def fail(_):
        raise AssertionError("the model loader ran")

    monkeypatch.setattr(loading, "resolve_source", fail)

    with pytest.raises(ValueError, match="config.num_games"):
        train.train_and_evaluate(_config(num_games=-5), str(tmp_path))


def test_unlearning_config_switches_halfway():
    config = unlearning.get_config("deontological")

    settings = run_config.validate(config)

    assert config.num_updates == 24
    assert settings.reward_phases == ((0, "game"), (12, "deontological"))
    assert train.default_run_name(config) == (
        "prisoners_dilemma__game12-deontological__tit_for_tat__seed0")

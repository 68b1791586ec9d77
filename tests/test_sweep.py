"""Agent lists of sweeps and populations, and who plays whom."""

import itertools

import numpy as np
import pytest

from configs import ipd
from moral_rl import run_config, sweep


def _config(**sweep_fields):
    config = ipd.get_config("utilitarian,smoke")
    for field, value in sweep_fields.items():
        group, name = field.split("__")
        config[group][name] = value
    return config


def test_single_agent_without_sweep():
    specs = sweep.agent_specs(_config())

    assert len(specs) == 1
    assert specs[0].seed == 0
    assert specs[0].reward_schedule == "utilitarian"
    assert specs[0].opponent == "tit_for_tat"
    assert specs[0].member == -1


def test_sweep_crosses_seed_reward_opponent():
    specs = sweep.agent_specs(_config(
        sweep__seeds="3,4", sweep__rewards="game;game:2,utilitarian",
        sweep__opponents="tit_for_tat,random"))

    assert len(specs) == 8
    assert [s.seed for s in specs] == [3] * 4 + [4] * 4
    assert [s.reward_schedule for s in specs[:4]] == [
        "game", "game", "game:2,utilitarian", "game:2,utilitarian"]
    assert [s.opponent for s in specs[:2]] == ["tit_for_tat", "random"]
    assert len({s.name for s in specs}) == 8


def test_population_members_per_seed():
    specs = sweep.agent_specs(_config(
        sweep__seeds="0,1", population__rewards="game;utilitarian"))

    assert [(s.population, s.member, s.seed) for s in specs] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    assert all(s.opponent == "learner" for s in specs)
    assert sweep.population_size(specs) == 2


@pytest.mark.parametrize("fields, message", [
    ({"population__rewards": "game;utilitarian;game"}, "even number"),
    ({"population__rewards": "game;utilitarian",
      "sweep__rewards": "game"}, "population.rewards is set together"),
    ({"sweep__seeds": "0,0"}, "repeats a seed"),
    ({"sweep__seeds": "zero"}, "sweep.seeds='zero'"),
    ({"sweep__rewards": "game;game"}, "lists an entry twice"),
])
def test_invalid_sweep_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        sweep.agent_specs(_config(**fields))


@pytest.mark.parametrize("fields, message", [
    ({"sweep__rewards": "game;kindness"}, "sweep.rewards"),
    ({"sweep__opponents": "tit_for_tat,grudger"}, "sweep.opponents"),
    ({"population__rewards": "game;utilitarian",
      "population__matching": "swiss"}, "population.matching"),
])
def test_validate_names_bad_agent_field(fields, message):
    with pytest.raises(ValueError, match=message):
        run_config.validate(_config(**fields))


@pytest.mark.parametrize("size", [2, 4, 6])
def test_round_robin_meets_every_pair_once(size):
    met = []
    for round_index in range(size - 1):
        partner = sweep.round_robin_pairs(size, round_index)
        np.testing.assert_array_equal(partner[partner], np.arange(size))
        assert not np.any(partner == np.arange(size))
        met += [tuple(sorted((i, int(j)))) for i, j in enumerate(partner)]

    expected = set(itertools.combinations(range(size), 2))
    assert set(met) == expected
    # Each pair appears twice per round (once from each side).
    assert len(met) == 2 * len(expected)


def test_random_matching_stays_in_population():
    specs = sweep.agent_specs(_config(
        sweep__seeds="0,1", population__rewards="game;utilitarian;"
        "deontological;game_deontological"))

    pairings = set()
    for step in range(20):
        partner = sweep.partners(specs, "random", step)
        np.testing.assert_array_equal(partner[partner], np.arange(8))
        assert np.all((partner < 4) == (np.arange(8) < 4))
        assert not np.any(partner == np.arange(8))
        pairings.add(tuple(partner[:4]))

    np.testing.assert_array_equal(sweep.partners(specs, "random", 7),
                                  sweep.partners(specs, "random", 7))
    # Four members have three pairings; twenty draws see more than one.
    assert len(pairings) > 1


def test_fixed_matching_pairs_neighbours():
    specs = sweep.agent_specs(_config(
        population__rewards="game;game;utilitarian;utilitarian"))

    for step in (0, 5):
        np.testing.assert_array_equal(
            sweep.partners(specs, "fixed", step), [1, 0, 3, 2])


def test_scripted_opponents_have_no_partners():
    assert sweep.partners(sweep.agent_specs(_config()), "fixed", 0) is None


def test_sweep_configs_validate():
    from configs import population
    from configs import sweep as sweep_configs

    grid = run_config.validate(sweep_configs.get_config("grid"))
    unlearning = run_config.validate(sweep_configs.get_config("unlearning"))
    pairs = run_config.validate(population.get_config("llm_vs_llm"))
    four = run_config.validate(population.get_config("population"))

    assert grid.num_adapters == 20
    assert {a.reward_schedule for a in grid.agents} == set(
        sweep_configs.PAPER_REWARDS)
    assert unlearning.agent_phases[0] == ((0, "game"), (12, "utilitarian"))
    assert pairs.matching == "fixed"
    assert [a.reward_schedule for a in pairs.agents[:2]] == ["game", "game"]
    assert four.matching == "round_robin"
    assert four.num_adapters == 4


def test_unknown_sweep_experiment_raises():
    from configs import population
    from configs import sweep as sweep_configs

    with pytest.raises(ValueError, match="Unknown sweep 'grd'"):
        sweep_configs.get_config("grd")
    with pytest.raises(ValueError, match="Unknown population experiment"):
        population.get_config("tournament")

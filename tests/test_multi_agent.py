"""Many agents in one program on a tiny random model.

Pins: agent i of a sweep computes what a one-agent run with its seed and
reward computes; a diverged agent is masked while the others train; the
two seats of a population game see one game; a population run reports who
met whom; a sharded update on 8 simulated devices equals the one-device
update.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ipd
from moral_rl import learner, outputs, run_folders, summary, sweep, train
from moral_rl.models import lora as lora_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(folder, num_updates=2):
    config = ipd.get_config("utilitarian,smoke")
    config.model.name = folder
    config.num_updates = num_updates
    config.lora.rank = 2
    config.checkpoint_every = num_updates
    config.figure_every = num_updates
    # Raw rewards keep gradients on a model that answers illegally almost
    # always (normalised equal rewards would give zero advantages).
    config.ppo.reward_norm = False
    config.ppo.reward_scaling = False
    return config


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama_factory):
    return tiny_llama_factory(head_scale=0.5, seed=11).folder


def _final(folder):
    with open(os.path.join(folder, outputs.FINAL_METRICS_FILE)) as f:
        return json.load(f)["metrics"]


@pytest.fixture(scope="module")
def tiny_sweep(tiny_folder, tmp_path_factory):
    """A finished sweep of 2 seeds x 2 rewards (one with a schedule)."""
    config = _tiny_config(tiny_folder)
    config.sweep.seeds = "1,2"
    config.sweep.rewards = "game:1,utilitarian;deontological"
    workdir = tmp_path_factory.mktemp("sweep")
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


@pytest.mark.slow
def test_sweep_equals_separate_runs(tiny_sweep, tiny_folder, tmp_path):
    config, workdir = tiny_sweep
    specs = sweep.agent_specs(config)
    with open(workdir / outputs.SWEEP_FILE) as f:
        assert json.load(f)["agents"] == [s.name for s in specs]
    for spec in specs:
        single = _tiny_config(tiny_folder)
        single.seed = spec.seed
        if ":" in spec.reward_schedule:
            single.reward_schedule = spec.reward_schedule
        else:
            single.reward = spec.reward_schedule
        train.train_and_evaluate(single, str(tmp_path / spec.name))

        together = _final(workdir / spec.name)
        alone = _final(tmp_path / spec.name)
        for name in ("policy/p_cooperate", "ppo/policy_loss",
                     "actions/cooperation", "reward/active", "reward/phase"):
            np.testing.assert_allclose(together[name], alone[name],
                                       rtol=1e-4, atol=1e-6, err_msg=name)
        adapter_together = lora_lib.load_lora(
            str(workdir / spec.name / outputs.ADAPTER_DIR))
        adapter_alone = lora_lib.load_lora(
            str(tmp_path / spec.name / outputs.ADAPTER_DIR))
        for a, b in zip(jax.tree.leaves(adapter_together),
                        jax.tree.leaves(adapter_alone)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_and_export_agree(tiny_sweep):
    config, workdir = tiny_sweep
    folders = run_folders.expand_folders([str(workdir)])
    assert [os.path.basename(f) for f in folders] == [
        s.name for s in sweep.agent_specs(config)]

    agent = folders[2]
    exported = run_folders.load_agent(agent)
    restored = run_folders.load_agent(agent, step=config.num_updates)

    assert exported.step == restored.step == config.num_updates
    assert exported.config.seed == 2
    for a, b in zip(jax.tree.leaves(exported.adapter),
                    jax.tree.leaves(restored.adapter)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def two_agent_run(tiny_folder):
    config = _tiny_config(tiny_folder)
    config.sweep.seeds = "0,1"
    return train.build_run(config)


@pytest.mark.slow
def test_diverged_agent_is_masked(two_agent_run):
    run = two_agent_run
    state = run.state
    # A huge value head makes agent 0's value loss overflow to inf.
    kernel = state.agents.adapter["value_head"]["kernel"]
    state = state.replace(agents=state.agents.replace(adapter={
        **state.agents.adapter,
        "value_head": {**state.agents.adapter["value_head"],
                       "kernel": kernel.at[0].set(1e30)}}))
    before = jax.tree.map(np.asarray, state.agents.adapter)
    update = jax.jit(lambda s, i: learner.update_step(
        s, i, settings=run.step_settings))

    state, metrics = update(state, run.inputs)
    state, metrics = update(state, run.inputs)

    np.testing.assert_array_equal(metrics["health/failed"], [1.0, 0.0])
    np.testing.assert_array_equal(state.agents.failed, [True, False])
    after = state.agents.adapter
    lora_b_before = before["lora"]["layers"]["attn"]["q"]["b"]
    lora_b_after = np.asarray(after["lora"]["layers"]["attn"]["q"]["b"])
    np.testing.assert_array_equal(lora_b_after[0], lora_b_before[0])
    assert not np.array_equal(lora_b_after[1], lora_b_before[1])
    assert np.all(np.isfinite(lora_b_after[1]))


@pytest.mark.slow
def test_population_seats_share_games(tiny_folder):
    config = _tiny_config(tiny_folder)
    config.population.rewards = "game;utilitarian"
    run = train.build_run(config)
    partner = jnp.asarray(sweep.partners(sweep.agent_specs(config),
                                         "fixed", 0))
    games = run.state.agents.games
    np.testing.assert_array_equal(games.prev_action_m[1],
                                  games.prev_action_o[0])

    state, metrics = jax.jit(lambda s, i, p: learner.update_step(
        s, i, p, settings=run.step_settings))(run.state, run.inputs, partner)

    games = state.agents.games
    np.testing.assert_array_equal(games.prev_action_m[1],
                                  games.prev_action_o[0])
    np.testing.assert_array_equal(games.prev_action_o[1],
                                  games.prev_action_m[0])
    # Each seat's payoff is the other seat's opponent payoff.
    np.testing.assert_allclose(metrics["payoff/agent"][0],
                               metrics["payoff/opponent"][1], rtol=1e-6)


def _record(partner, cooperation, exploitation, deontological, payoff=1.0):
    return {"population/partner": partner,
            "actions/cooperation": cooperation,
            "actions/d_given_c": exploitation, "payoff/agent": payoff,
            "regret/deontological": deontological,
            "regret/utilitarian": 1.0 - cooperation}


def test_population_table_averages_per_partner():
    agents = [sweep.AgentSpec(name=f"{reward}_{i}", seed=0,
                              reward_schedule=reward, opponent="learner",
                              member=i)
              for i, reward in enumerate(("game", "utilitarian", "game"))]
    # Agent 0 met agent 1 twice and agent 2 once. Agents 1 and 2 met once.
    histories = [
        [_record(1, 0.2, 0.5, 1.0), _record(1, 0.4, 0.3, 3.0),
         _record(2, 0.0, 0.0, 0.0)],
        [_record(0, 1.0, 0.0, 0.0), _record(0, 0.8, 0.0, 0.0),
         _record(2, 0.6, 0.1, 2.0)],
        [_record(0, 0.1, 0.9, 4.0), _record(1, 0.3, 0.2, 2.0)],
    ]

    table = outputs.population_table(agents, histories)

    np.testing.assert_array_equal(table["meetings"],
                                  [[0, 2, 1], [2, 0, 1], [1, 1, 0]])
    assert table["cooperation"][0][1] == pytest.approx(0.3)
    assert table["exploitation"][0][1] == pytest.approx(0.4)
    assert table["deontological_regret"][0][1] == pytest.approx(2.0)
    assert table["utilitarian_regret"][1][0] == pytest.approx(0.1)
    assert table["cooperation"][2][2] is None
    assert table["last"]["cooperation"][0][1] == pytest.approx(0.4)
    assert table["last"]["exploitation"][2][0] == pytest.approx(0.9)
    assert table["last"]["cooperation"][1][1] is None
    # The overall column weighs every update alike, not every partner.
    assert table["overall"]["cooperation"][0] == pytest.approx(0.2)
    assert table["overall"]["deontological_regret"][2] == pytest.approx(3.0)
    markdown = outputs.population_markdown(table)
    assert "| agent \\ partner |" in markdown
    assert "D|C rate" in markdown
    assert "| 0.300 |" in markdown


@pytest.mark.slow
def test_round_robin_population_table(tiny_folder, tmp_path):
    config = _tiny_config(tiny_folder, num_updates=3)
    config.population.rewards = ("game;deontological;utilitarian;"
                                 "game_deontological")
    config.population.matching = "round_robin"
    train.train_and_evaluate(config, str(tmp_path))

    with open(tmp_path / outputs.POPULATION_FILE) as f:
        table = json.load(f)
    meetings = np.asarray(table["meetings"])
    # Three rounds of a four-member round robin: every pair met once.
    np.testing.assert_array_equal(meetings, 1 - np.eye(4, dtype=int))
    assert table["cooperation"][0][0] is None
    assert 0.0 <= table["cooperation"][0][1] <= 1.0
    assert (tmp_path / "population.md").is_file()
    for name in table["agents"]:
        assert (tmp_path / name / outputs.ADAPTER_DIR).is_dir()


@pytest.mark.slow
def test_sharded_update_matches_one_device(tiny_folder):
    script = os.path.join(ROOT, "tests", "sharded_update.py")
    env = dict(os.environ,
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, script, tiny_folder],
                            capture_output=True, text=True, env=env,
                            timeout=900, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["mesh"] == {"adapter": 2, "data": 2, "model": 2}
    assert report["max_metric_difference"] < 1e-4
    assert report["max_adapter_difference"] < 1e-5
    assert report["adapters_moved"]


@pytest.mark.slow
def test_summary_lists_every_agent(tiny_sweep):
    config, workdir = tiny_sweep

    lines = summary.markdown_table([str(workdir)]).splitlines()

    names = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert names == [s.name for s in sweep.agent_specs(config)]


@pytest.mark.slow
def test_rerun_writes_missing_final_files(tiny_sweep, tmp_path,
                                          monkeypatch):
    config, workdir = tiny_sweep
    shutil.copytree(workdir, tmp_path / "copy")
    names = [s.name for s in sweep.agent_specs(config)]
    for name in names:
        os.remove(tmp_path / "copy" / name / outputs.FINAL_METRICS_FILE)
        shutil.rmtree(tmp_path / "copy" / name / outputs.ADAPTER_DIR)
    # A relative workdir, as users pass on the command line.
    monkeypatch.chdir(tmp_path)

    train.train_and_evaluate(config, "copy")

    for name in names:
        restored = _final(tmp_path / "copy" / name)
        original = _final(workdir / name)
        np.testing.assert_allclose(restored["policy/p_cooperate"],
                                   original["policy/p_cooperate"])
        assert (tmp_path / "copy" / name / outputs.ADAPTER_DIR).is_dir()


@pytest.mark.slow
def test_population_members_start_apart(tiny_folder):
    config = _tiny_config(tiny_folder)
    config.population.rewards = "game;game"

    run = train.build_run(config)

    lora_a = run.state.agents.adapter["lora"]["layers"]["attn"]["q"]["a"]
    assert not np.array_equal(lora_a[0], lora_a[1])
    assert not np.array_equal(jax.random.key_data(run.state.key[0]),
                              jax.random.key_data(run.state.key[1]))

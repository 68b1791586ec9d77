"""Evaluation: prompt variants, test games, regrets, CIs and run folders.

Pins: every prompt variant renders 24 distinct prompts and the story has
no digits; regrets and action types of scripted policies (always C,
always D, tit-for-tat-like, always illegal) equal hand-computed values,
exactly and in sampled test games; Student-t intervals on known data;
the evaluation tables' columns; clear errors for missing runs, adapters,
checkpoints, games and variants; an end-to-end evaluation of a tiny
random model writes every output file.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ipd
from moral_rl import checkpoint as checkpoint_lib
from moral_rl import evaluate, figures, generalisation, prompts, run_folders
from moral_rl import policy as policy_lib
from moral_rl import writer as writer_lib
from moral_rl.games import env, payoffs
from moral_rl.games.payoffs import COOPERATE, DEFECT, ILLEGAL
from moral_rl.models import loading
from moral_rl.models import lora as lora_lib

PD = payoffs.get_game("prisoners_dilemma")
TEST_STRINGS = ("action3", "action4")


def _scripted(choose):
    """[P, 3] log-probs of a deterministic policy choose(PromptState)."""
    rows = [np.eye(3)[choose(state)] for state in prompts.all_prompt_states()]
    return jnp.log(jnp.asarray(rows, jnp.float32))


ALWAYS_C = _scripted(lambda s: COOPERATE)
ALWAYS_D = _scripted(lambda s: DEFECT)
ALWAYS_ILLEGAL = _scripted(lambda s: ILLEGAL)
# Copies the opponent's previous move, as Tit-for-Tat does.
RECIPROCAL = _scripted(lambda s: s.prev_action_o)


def _params(game="prisoners_dilemma", opponent="random"):
    return env.make_env_params(game, opponent, "deontological")


# Prompt variants.


@pytest.mark.parametrize("template", sorted(prompts.TEMPLATES))
def test_variant_renders_every_state(template):
    render = prompts.get_template(template)

    texts = [render(PD, TEST_STRINGS, s) for s in prompts.all_prompt_states()]

    assert len(set(texts)) == prompts.NUM_PROMPTS
    for text in texts:
        assert "action3" in text
        assert "action4" in text
        assert text.endswith("Your answer:")


def test_variants_differ_from_each_other():
    state = prompts.PromptState(COOPERATE, DEFECT, False, True)

    texts = {name: render(PD, TEST_STRINGS, state)
             for name, render in prompts.TEMPLATES.items()}

    assert len(set(texts.values())) == len(prompts.TEMPLATES)


@pytest.mark.parametrize("game", sorted(payoffs.GAMES))
def test_story_variant_has_no_digits(game):
    for state in prompts.all_prompt_states():
        text = prompts.story_template(payoffs.get_game(game),
                                      ("share", "keep"), state)

        assert not any(ch.isdigit() for ch in text), text


def test_story_ranks_outcomes_in_words():
    state = prompts.PromptState(COOPERATE, COOPERATE, False, False)

    text = prompts.story_template(PD, TEST_STRINGS, state)

    # PD: D against C is the best outcome for you, C against D the worst.
    assert ("If you choose action4 and your neighbour chooses action3, it "
            "is the best day for you and the worst day") in text
    assert "action3, it is a good day for you and a good day" in text


def test_rows_reversed_puts_d_row_first():
    state = prompts.PromptState(COOPERATE, COOPERATE, False, False)

    text = prompts.rows_reversed_template(PD, TEST_STRINGS, state)

    d_row = text.index("| action4 | you get 4, they get 0")
    c_row = text.index("| action3 | you get 3, they get 3")
    assert d_row < c_row


def test_columns_reversed_swaps_header_and_cells():
    state = prompts.PromptState(COOPERATE, COOPERATE, False, False)

    text = prompts.columns_reversed_template(PD, TEST_STRINGS, state)

    assert "| you \\ other agent | action4 | action3 |" in text
    assert ("| action3 | you get 0, they get 4 | you get 3, they get 3 |"
            in text)


def test_named_game_names_the_game():
    state = prompts.PromptState(DEFECT, COOPERATE, False, False)

    text = prompts.named_game_template(PD, TEST_STRINGS, state)

    assert text.startswith("You are playing a game called the Iterated "
                           "Prisoner's Dilemma")


def test_friend_variant_has_no_table():
    state = prompts.PromptState(ILLEGAL, DEFECT, False, False)

    text = prompts.friend_template(PD, TEST_STRINGS, state)

    assert "|" not in text
    assert "you get 4 points and your friend gets 0 points" in text
    assert "did not pick a valid action" in text


# Regrets of scripted policies.

# (policy, game, expected {metric: value}) computed by hand for one round
# against Random from a uniform previous round. PD collective payoffs:
# CC 6, CD 4, DC 4, DD 2 (spread 4); Chicken: CC 4, CD 5, DC 5, DD 0
# (spread 5).
SCRIPTED_CASES = [
    ("always_c", ALWAYS_C, "prisoners_dilemma",
     {"deontological_regret": 0.0, "utilitarian_regret": 0.0,
      "cooperation": 1.0, "c_given_c": 0.5, "c_given_d": 0.5}),
    # D after C costs xi = 3 (half the rounds); D loses 2 of 4 either way.
    ("always_d", ALWAYS_D, "prisoners_dilemma",
     {"deontological_regret": 1.5, "utilitarian_regret": 0.5,
      "cooperation": 0.0, "d_given_c": 0.5, "d_given_d": 0.5}),
    # D only after D (no norm broken); loses 0.5 when D, D half the time.
    ("reciprocal", RECIPROCAL, "prisoners_dilemma",
     {"deontological_regret": 0.0, "utilitarian_regret": 0.25,
      "c_given_c": 0.5, "d_given_d": 0.5, "cooperation": 0.5}),
    ("always_illegal", ALWAYS_ILLEGAL, "prisoners_dilemma",
     {"deontological_regret": 6.0, "utilitarian_regret": 1.0,
      "illegal": 1.0, "illegal_given_c": 0.5, "cooperation": 0.0}),
    # Chicken: C loses 1 of 5 against C, nothing against D.
    ("always_c", ALWAYS_C, "chicken",
     {"deontological_regret": 0.0, "utilitarian_regret": 0.1}),
    # Chicken: D loses nothing against C, all 5 against D.
    ("always_d", ALWAYS_D, "chicken",
     {"deontological_regret": 1.5, "utilitarian_regret": 0.5}),
]


@pytest.mark.parametrize("name,log_probs,game,expected", SCRIPTED_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in SCRIPTED_CASES])
def test_expected_metrics_of_scripted_policy(name, log_probs, game, expected):
    values = generalisation.expected_metrics(log_probs, _params(game))

    for metric, value in expected.items():
        assert values[metric] == pytest.approx(value, abs=1e-6), metric


def test_expected_action_types_sum_to_one():
    uniform = jnp.full((prompts.NUM_PROMPTS, 3), jnp.log(1 / 3))

    values = generalisation.expected_metrics(uniform, _params())

    total = sum(values[name] for name in generalisation.METRICS[:6])
    assert total == pytest.approx(1.0, abs=1e-6)
    assert values["illegal"] == pytest.approx(1 / 3, abs=1e-6)


def test_sampled_regrets_of_always_c_are_zero():
    per_game = generalisation.play_seeds(jax.random.key(0), ALWAYS_C,
                                         _params(), num_seeds=5, num_games=50)

    row = generalisation.summarise(per_game)

    assert row["n"] == 250
    assert row["deontological_regret_mean"] == 0.0
    assert row["utilitarian_regret_mean"] == 0.0
    assert row["cooperation_mean"] == 1.0


def test_sampled_regrets_of_illegal_are_worst_case():
    per_game = generalisation.play_seeds(jax.random.key(1), ALWAYS_ILLEGAL,
                                         _params(), num_seeds=2, num_games=20)

    row = generalisation.summarise(per_game)

    assert row["deontological_regret_mean"] == pytest.approx(6.0)
    assert row["utilitarian_regret_mean"] == pytest.approx(1.0)
    assert row["utilitarian_regret_ci_low"] == pytest.approx(1.0)
    assert row["utilitarian_regret_ci_high"] == pytest.approx(1.0)


def test_sampled_always_d_regret_follows_action_types():
    per_game = generalisation.play_seeds(jax.random.key(2), ALWAYS_D,
                                         _params(), num_seeds=5, num_games=50)

    # The penalty xi = 3 falls exactly on the rounds after O cooperated.
    np.testing.assert_allclose(per_game["deontological_regret"],
                               3.0 * per_game["d_given_c"])
    np.testing.assert_allclose(per_game["utilitarian_regret"], 0.5)


def test_sampled_mean_brackets_expected_value():
    params = _params()
    per_game = generalisation.play_seeds(jax.random.key(3), RECIPROCAL,
                                         params, num_seeds=5, num_games=50)

    row = generalisation.summarise(
        per_game, generalisation.expected_metrics(RECIPROCAL, params))

    assert row["utilitarian_regret_expected"] == pytest.approx(0.25)
    assert (row["utilitarian_regret_ci_low"] < 0.25
            < row["utilitarian_regret_ci_high"])


def test_multi_round_games_average_rounds():
    per_game = generalisation.play_test_games(
        jax.random.key(4), ALWAYS_D, _params(), num_games=8, num_rounds=5)

    # After the first round the agent's own last move is D in every game.
    assert per_game["deontological_regret"].shape == (8,)
    np.testing.assert_allclose(per_game["cooperation"], 0.0)


# Confidence intervals.


def test_confidence_interval_of_known_data():
    mean, std, low, high = generalisation.confidence_interval(
        [1.0, 2.0, 3.0, 4.0, 5.0])

    # t(0.975, 4) = 2.776445; std = sqrt(2.5); half = t * std / sqrt(5).
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(np.sqrt(2.5))
    assert low == pytest.approx(3.0 - 1.963243, abs=1e-5)
    assert high == pytest.approx(3.0 + 1.963243, abs=1e-5)


def test_confidence_interval_of_constant_data_is_a_point():
    mean, std, low, high = generalisation.confidence_interval([2.0] * 10)

    assert (mean, std, low, high) == (2.0, 0.0, 2.0, 2.0)


def test_confidence_interval_of_one_value_is_nan():
    mean, std, low, high = generalisation.confidence_interval([4.0])

    assert mean == 4.0
    assert np.isnan(std) and np.isnan(low) and np.isnan(high)


def test_confidence_interval_rejects_bad_coverage():
    with pytest.raises(ValueError, match="confidence=1.5"):
        generalisation.confidence_interval([1.0, 2.0], confidence=1.5)


def test_pooled_interval_matches_concatenated_sample():
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=n) for n in (7, 12, 30)]
    moments = [(s.size, s.mean(), s.std(ddof=1)) for s in samples]

    pooled = generalisation.pooled_confidence_interval(*zip(*moments))

    direct = generalisation.confidence_interval(np.concatenate(samples))
    np.testing.assert_allclose(pooled, direct, rtol=1e-10)


def test_summary_row_has_every_column():
    per_game = generalisation.play_seeds(jax.random.key(0), ALWAYS_C,
                                         _params(), num_seeds=2, num_games=3)

    row = generalisation.summarise(per_game)

    expected = ["n"] + [f"{m}_{s}" for m in generalisation.METRICS
                        for s in generalisation.STATISTICS]
    assert list(row) == expected
    assert np.isnan(row["cooperation_expected"])


def test_regret_by_group_pools_agents():
    rows = [{"group": "utilitarian", "game": "chicken", "variant": "story",
             "n": 4, "deontological_regret_mean": m,
             "deontological_regret_std": 0.0,
             "utilitarian_regret_mean": m / 6,
             "utilitarian_regret_std": 0.0} for m in (0.0, 6.0)]

    [pooled] = figures.regret_by_group(rows, "story")

    assert pooled["n"] == 8
    assert pooled["deontological_mean"] == pytest.approx(3.0)
    assert pooled["utilitarian_mean"] == pytest.approx(0.5)
    assert pooled["deontological_ci_low"] < 3.0 < pooled[
        "deontological_ci_high"]
    assert figures.regret_by_group(rows, "standard") == []


def test_action_counts_sum_over_seeds():
    config = ipd.get_config("game,smoke")
    history = [{"step": 1, "actions/c_given_c": 0.25, "actions/c_given_d": 0,
                "actions/d_given_c": 0.5, "actions/d_given_d": 0.25,
                "actions/illegal": 0.0}]

    rows = figures.action_counts_by_reward([(config, history)] * 3)

    assert len(rows) == 1
    assert rows[0]["runs"] == 3
    # 64 games per smoke run, three runs.
    assert rows[0]["actions/d_given_c"] == pytest.approx(0.5 * 64 * 3)


# Settings and folder errors.


def test_unknown_variant_raises():
    with pytest.raises(KeyError, match="no_such_variant"):
        evaluate.EvalSettings(variants=("standard", "no_such_variant"))


def test_unknown_game_raises():
    with pytest.raises(KeyError, match="no_such_game"):
        evaluate.EvalSettings(games=("no_such_game",))


def test_invalid_game_count_raises():
    with pytest.raises(ValueError, match="num_games=0"):
        evaluate.EvalSettings(num_games=0)


def test_game_file_registers_games(tmp_path, monkeypatch):
    monkeypatch.setattr(payoffs, "GAMES", dict(payoffs.GAMES))
    path = tmp_path / "games.json"
    path.write_text(json.dumps({"harmony": {
        "payoffs": [[[4, 4], [2, 3]], [[3, 2], [1, 1]]]}}))

    names = evaluate.register_games_file(str(path))

    assert names == ["harmony"]
    settings = evaluate.EvalSettings(games=("harmony",))
    assert settings.games == ("harmony",)
    with pytest.raises(ValueError, match="already registered"):
        evaluate.register_games_file(str(path))


def test_missing_run_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_folders.expand_folders([str(tmp_path / "nope")])


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(ValueError, match="neither config.json nor"):
        run_folders.expand_folders([str(tmp_path)])


def _write_run(folder, **overrides):
    config = ipd.get_config("utilitarian,smoke")
    for name, value in overrides.items():
        config[name] = value
    writer_lib.write_config(folder, config.to_dict())
    return config


def test_sweep_expands_to_agents_in_order(tmp_path):
    for name in ("b", "a"):
        _write_run(str(tmp_path / name))
    (tmp_path / "sweep.json").write_text(json.dumps({"agents": ["b", "a"]}))

    folders = run_folders.expand_folders([str(tmp_path)])

    assert folders == [str(tmp_path / "b"), str(tmp_path / "a")]


def test_run_without_adapter_raises(tmp_path):
    _write_run(str(tmp_path))

    with pytest.raises(FileNotFoundError, match="no adapter/ folder"):
        run_folders.load_agent(str(tmp_path))


def test_step_without_checkpoint_raises(tmp_path):
    _write_run(str(tmp_path))

    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        run_folders.load_agent(str(tmp_path), step=3)


def test_unknown_baseline_raises():
    with pytest.raises(KeyError, match="virtue"):
        evaluate.base_models("smollm2-135m-instruct", ("virtue",))


# End to end on a tiny random model.


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama_factory):
    """A tiny Llama whose context fits the follow-up conversations."""
    folder = tiny_llama_factory(head_scale=0.5, seed=7).folder
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    # RoPE positions have no learned table, so a longer context is valid.
    config["max_position_embeddings"] = 1024
    with open(path, "w") as f:
        json.dump(config, f)
    return folder


def _random_adapter(key, model_config, spec):
    """One adapter with non-zero B, so it changes the model."""
    lora = lora_lib.select_adapter(
        lora_lib.init_lora(key, model_config, spec, 1), 0)
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if path[-1].key == "b" else x, lora)
    head = jax.tree.map(lambda x: x[0], policy_lib.init_value_head(
        model_config.hidden_size, 1))
    return {"lora": lora, "value_head": head}


@pytest.fixture(scope="module")
def tiny_sweep(tiny_folder, tmp_path_factory):
    """A sweep folder of two finished agents over the tiny model."""
    sweep = tmp_path_factory.mktemp("sweep")
    model_config, _ = loading.load_config_and_params(
        loading.resolve_source(tiny_folder))
    agents = {"utilitarian__seed0": ("utilitarian", 0),
              "game__seed1": ("game", 1)}
    for name, (reward, seed) in agents.items():
        folder = str(sweep / name)
        config = _write_run(folder, reward=reward, seed=seed)
        config.model.name = tiny_folder
        config.lora.rank = 2
        writer_lib.write_config(folder, config.to_dict())
        spec = lora_lib.make_lora_spec(2, config.lora.alpha, "all")
        lora_lib.save_lora(os.path.join(os.path.abspath(folder), "adapter"),
                           _random_adapter(jax.random.key(seed),
                                           model_config, spec))
    (sweep / "sweep.json").write_text(json.dumps({"agents": list(agents)}))
    return str(sweep)


SMALL = evaluate.EvalSettings(
    games=("prisoners_dilemma", "chicken"), variants=("standard", "story"),
    num_games=6, num_seeds=2, questions=("Why?", "What do you value?"),
    followup_tokens=4, answer_tokens=3)


@pytest.fixture(scope="module")
def evaluated(tiny_sweep, tiny_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval"))
    models = (evaluate.run_models([tiny_sweep])
              + evaluate.base_models(tiny_folder, ("utilitarian",)))
    rows = evaluate.evaluate(models, SMALL, out)
    return out, rows


@pytest.mark.slow
def test_metrics_table_has_row_per_case(evaluated):
    out, rows = evaluated

    table = figures.read_csv(os.path.join(out, evaluate.METRICS_FILE))

    assert len(table) == 4 * 2 * 2
    assert list(table[0])[:13] == [
        "model", "kind", "group", "seed", "step", "game", "variant",
        "opponent", "action_strings", "num_seeds", "num_games",
        "num_rounds", "n"]
    assert len(table[0]) == 13 + len(generalisation.METRICS) * len(
        generalisation.STATISTICS) + 2
    assert list(table[0])[-2:] == ["retention_probe_kl",
                                   "retention_unchanged_fraction"]
    models = list(dict.fromkeys(row["model"] for row in table))
    assert models == ["utilitarian__seed0", "game__seed1", "untuned",
                      "untuned_utilitarian_prompt"]
    assert {row["n"] for row in table} == {12.0}


@pytest.mark.slow
def test_retention_columns_compare_with_base(evaluated):
    _, rows = evaluated
    by_model = {row["model"]: row for row in rows}

    untuned = by_model["untuned"]
    adapted = by_model["utilitarian__seed0"]
    assert untuned["retention_probe_kl"] == pytest.approx(0.0, abs=1e-5)
    assert untuned["retention_unchanged_fraction"] == 1.0
    # The test adapter has B = 0.5 everywhere, far from the base model.
    assert adapted["retention_probe_kl"] > 0.01
    assert adapted["retention_unchanged_fraction"] < 1.0


@pytest.mark.slow
def test_distributions_are_normalised(evaluated):
    out, _ = evaluated

    with open(os.path.join(out, evaluate.DISTRIBUTIONS_FILE)) as f:
        distributions = json.load(f)

    probs = np.asarray(distributions["untuned"]["chicken"]["story"])
    assert probs.shape == (prompts.NUM_PROMPTS, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    adapted = np.asarray(
        distributions["utilitarian__seed0"]["chicken"]["story"])
    # Relative: the tiny model's legal answers are far below 1e-8.
    assert not np.allclose(adapted[:, :2], probs[:, :2], rtol=1e-3, atol=0)


@pytest.mark.slow
def test_expected_values_match_distributions(evaluated):
    out, rows = evaluated

    with open(os.path.join(out, evaluate.DISTRIBUTIONS_FILE)) as f:
        distributions = json.load(f)

    row = rows[0]
    probs = np.asarray(distributions[row["model"]][row["game"]][
        row["variant"]])
    expected = generalisation.expected_metrics(
        jnp.log(jnp.asarray(probs)), _params(row["game"]))
    assert row["illegal_expected"] == pytest.approx(expected["illegal"],
                                                    abs=1e-4)


@pytest.mark.slow
def test_followups_are_stored(evaluated):
    out, _ = evaluated

    with open(os.path.join(out, evaluate.FOLLOWUPS_FILE)) as f:
        records = json.load(f)

    # 4 models x 1 game x 2 states x 2 questions.
    assert len(records) == 16
    assert set(records[0]) == {"model", "game", "prompt", "answer",
                               "question", "reply"}
    assert [r["question"] for r in records[:2]] == ["Why?",
                                                    "What do you value?"]


@pytest.mark.slow
def test_regret_figures_and_tensorboard_written(evaluated):
    out, _ = evaluated
    files = set(os.listdir(out))

    assert {"regret_standard.png", "regret_standard.csv",
            "regret_story.png", "evaluation.json"} <= files
    regret = figures.read_csv(os.path.join(out, "regret_story.csv"))
    assert [row["group"] for row in regret[::2]] == [
        "utilitarian", "game", "untuned", "untuned + utilitarian prompt"]
    events = os.listdir(os.path.join(out, "tensorboard", "game__seed1"))
    assert any(name.startswith("events.out.tfevents") for name in events)


@pytest.mark.slow
def test_step_restores_checkpointed_adapter(tiny_folder, tmp_path):
    from moral_rl import train

    config = ipd.get_config("utilitarian,smoke")
    config.model.name = tiny_folder
    config.lora.rank = 2
    config.num_games = 8
    folder = str(tmp_path / "run")
    writer_lib.write_config(folder, config.to_dict())
    state = train.build_run(config).state
    adapter = jax.tree.map(lambda x: x + 0.25, state.agents.adapter)
    state = state.replace(agents=state.agents.replace(adapter=adapter))
    checkpointer = checkpoint_lib.Checkpointer(
        checkpoint_lib.checkpoint_dir(folder))
    checkpointer.save(2, state, force=True)
    checkpointer.close()

    agent = run_folders.load_agent(folder, step=2)

    assert agent.step == 2
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want[0]),
                 agent.adapter, adapter)
    with pytest.raises(FileNotFoundError, match=r"saved updates are \[2\]"):
        run_folders.load_agent(folder, step=3)


@pytest.mark.slow
def test_command_line_evaluates_run(tiny_sweep, tmp_path):
    out = str(tmp_path / "cli")

    code = evaluate.main([
        os.path.join(tiny_sweep, "game__seed1"), f"--out={out}",
        "--games=stag_hunt", "--variants=named_game", "--num_games=3",
        "--num_seeds=2", "--action_strings=left,right", "--question=",
        "--opponent=tit_for_tat"])

    assert code == 0
    [row] = figures.read_csv(os.path.join(out, evaluate.METRICS_FILE))
    assert (row["model"], row["game"], row["variant"]) == (
        "game__seed1", "stag_hunt", "named_game")
    assert row["action_strings"] == "left,right"
    assert row["opponent"] == "tit_for_tat"
    with open(os.path.join(out, evaluate.FOLLOWUPS_FILE)) as f:
        assert json.load(f) == []

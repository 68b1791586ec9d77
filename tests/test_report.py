"""The HTML report: figures with their data, tables, and rendering.

Pins: a report of runs (plain and unlearning) and an evaluation links
every figure relatively and writes its CSV beside it; the figure data are
the action counts summed over seeds and the switch of a reward schedule;
headless Chromium decodes every image of the page (skipped without
Chromium); missing inputs fail naming what to run.
"""

import json
import os
import shutil
import subprocess

import jax
import pytest

from configs import ipd
from moral_rl import evaluate, figures, generalisation, prompts, report
from moral_rl import writer as writer_lib
from moral_rl.games import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _history(num_updates, cooperation):
    return [{"step": step, "actions/c_given_c": cooperation(step) / 2,
             "actions/c_given_d": cooperation(step) / 2,
             "actions/d_given_c": (1 - cooperation(step)) / 2,
             "actions/d_given_d": (1 - cooperation(step)) / 2,
             "actions/illegal": 0.0}
            for step in range(1, num_updates + 1)]


def _write_run(folder, reward, seed, schedule=""):
    config = ipd.get_config(f"{reward},smoke")
    config.seed = seed
    config.reward_schedule = schedule
    writer_lib.write_config(folder, config.to_dict())
    if schedule:
        history = _history(6, lambda step: 0.0 if step <= 3 else 1.0)
    else:
        history = _history(4, lambda step: step / 4)
    with open(os.path.join(folder, "history.json"), "w") as f:
        json.dump(history, f)


def _write_eval(folder):
    """An evaluation folder whose rows come from scripted policies."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for group, action in (("utilitarian", 0), ("game", 1)):
        log_probs = jax.numpy.log(jax.numpy.asarray(
            [[1.0 - action, float(action), 0.0]] * prompts.NUM_PROMPTS))
        for game in ("prisoners_dilemma", "stag_hunt"):
            params = env.make_env_params(game, "random", "deontological")
            per_game = generalisation.play_seeds(
                jax.random.key(0), log_probs, params, num_seeds=2,
                num_games=5)
            rows.append({"model": f"{group}__seed0", "kind": "run",
                         "group": group, "seed": 0, "step": 4, "game": game,
                         "variant": "story", "opponent": "random",
                         "action_strings": "action3,action4",
                         "num_seeds": 2, "num_games": 5, "num_rounds": 1,
                         **generalisation.summarise(per_game)})
    figures.write_csv(os.path.join(folder, evaluate.METRICS_FILE), rows)
    with open(os.path.join(folder, evaluate.FOLLOWUPS_FILE), "w") as f:
        json.dump([{"model": "game__seed0", "game": "prisoners_dilemma",
                    "prompt": "...", "answer": "action4",
                    "question": "Why?", "reply": "<b>points</b>"}], f)


@pytest.fixture
def report_page(tmp_path):
    sweep = tmp_path / "sweep"
    agents = ["utilitarian__seed0", "utilitarian__seed1", "game__seed0"]
    for name in agents:
        reward, seed = name.split("__seed")
        _write_run(str(sweep / name), reward, int(seed))
    (sweep / "sweep.json").write_text(json.dumps({"agents": agents}))
    unlearning = tmp_path / "unlearning"
    _write_run(str(unlearning), "utilitarian", 0, "game:3,utilitarian")
    _write_eval(str(tmp_path / "eval"))

    path = report.build_report([str(sweep), str(unlearning)],
                               [str(tmp_path / "eval")],
                               str(tmp_path / "report"))
    return path


def test_report_links_every_figure(report_page):
    out = os.path.dirname(report_page)
    with open(report_page) as f:
        page = f.read()

    for name in ("figures/action_types_by_reward.png",
                 "figures/unlearning.png",
                 "figures/eval0/regret_story.png"):
        assert f"<img src=\"{name}\"" in page
        assert os.path.isfile(os.path.join(out, name))
        assert os.path.isfile(os.path.join(out, name[:-4] + ".csv"))
    assert page.count("<img ") == 3


def test_report_escapes_model_text(report_page):
    with open(report_page) as f:
        page = f.read()

    assert "&lt;b&gt;points&lt;/b&gt;" in page
    assert "<b>points</b>" not in page


def test_training_figure_data_sums_seeds(report_page):
    out = os.path.dirname(report_page)

    rows = figures.read_csv(os.path.join(
        out, "figures", "action_types_by_reward.csv"))

    utilitarian = [r for r in rows if r["reward"] == "utilitarian"]
    assert [r["step"] for r in utilitarian] == [1, 2, 3, 4]
    assert {r["runs"] for r in utilitarian} == {2}
    # Two 64-game smoke runs, cooperation 4/4 at update 4.
    assert utilitarian[-1]["actions/c_given_c"] == pytest.approx(64.0)
    assert {r["reward"] for r in rows} == {"utilitarian", "game"}


def test_unlearning_figure_marks_switch(report_page, monkeypatch):
    out = os.path.dirname(report_page)
    drawn = []
    monkeypatch.setattr(figures.plots, "action_type_panels_png",
                        lambda panels, **_: drawn.append(panels) or b"")
    config = ipd.get_config("utilitarian,smoke")
    config.reward_schedule = "game:3,utilitarian"

    figures.write_training_figures([(config, _history(6, lambda s: 0.0))],
                                   os.path.join(out, "again"))

    [[panel]] = drawn
    assert panel["switch_steps"] == [3]
    assert panel["title"] == "game:3,utilitarian (1 run)"


def test_report_of_missing_eval_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="moral_rl.evaluate"):
        report.build_report([], [str(tmp_path)], str(tmp_path / "out"))


def test_report_needs_inputs(tmp_path):
    with pytest.raises(ValueError, match="run folders or --eval_dir"):
        report.build_report([], [], str(tmp_path))


@pytest.mark.skipif(CHROMIUM is None,
                    reason="Chromium is not installed (Debian: apt-get "
                           "install chromium), so rendering is unchecked")
def test_chromium_renders_every_image(report_page):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "check_report.sh"),
         report_page], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images decoded: 3/3" in result.stdout


@pytest.mark.skipif(CHROMIUM is None,
                    reason="Chromium is not installed (Debian: apt-get "
                           "install chromium), so rendering is unchecked")
def test_chromium_check_catches_broken_image(report_page):
    out = os.path.dirname(report_page)
    os.remove(os.path.join(out, "figures", "unlearning.png"))

    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "check_report.sh"),
         report_page], capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert "Images decoded: 2/3" in result.stdout

"""The training loop end to end: files, resume after SIGKILL, learning.

Pins: a smoke run writes TensorBoard events, metrics, figures and
checkpoints; a run killed with SIGKILL and resumed ends with exactly the
metrics of an uninterrupted run; a short Utilitarian run on the embedded
model raises cooperation far above the untuned model's.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import ipd
from moral_rl import summary, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(folder, num_updates):
    config = ipd.get_config("utilitarian,smoke")
    config.model.name = folder
    config.num_updates = num_updates
    config.lora.rank = 2
    config.checkpoint_every = 1
    config.figure_every = 2
    return config


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama_factory):
    return tiny_llama_factory(head_scale=0.5, seed=7).folder


@pytest.fixture(scope="module")
def uninterrupted(tiny_folder, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    metrics = train.train_and_evaluate(_tiny_config(tiny_folder, 30),
                                       workdir)
    return workdir, metrics


@pytest.mark.slow
def test_smoke_run_writes_results(uninterrupted):
    workdir, metrics = uninterrupted
    files = set(os.listdir(workdir))

    assert {"config.json", "metrics.jsonl", "history.json",
            "final_metrics.json", "action_types.png"} <= files
    assert any(name.startswith("events.out.tfevents") for name in files)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "30"
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(31))
    assert len(metrics["actions/cooperation"]) == 1


@pytest.mark.slow
def test_summary_table_has_run_row(uninterrupted):
    workdir, metrics = uninterrupted

    lines = summary.markdown_table([workdir]).splitlines()

    assert len(lines) == 3
    header = re.split(r"(?<!\\)\|", lines[0].strip("|"))
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(header) == len(cells)
    assert header[5].strip() == "C\\|C"
    assert cells[1:5] == ["utilitarian", "tit_for_tat", "0", "30"]
    assert float(cells[10]) == pytest.approx(
        metrics["actions/cooperation"][0], abs=1e-3)


def test_summary_of_unfinished_run_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="final_metrics.json"):
        summary.run_row(str(tmp_path))


@pytest.mark.slow
def test_finished_run_returns_saved_metrics(uninterrupted, tiny_folder):
    workdir, metrics = uninterrupted

    again = train.train_and_evaluate(_tiny_config(tiny_folder, 30), workdir)

    assert sorted(again) == sorted(metrics)
    for name, values in metrics.items():
        # assert_equal counts NaN as equal to NaN (explained variance is NaN
        # while every return is the same).
        np.testing.assert_equal(again[name], values, err_msg=name)


def _main_command(folder, workdir, *extra):
    return [sys.executable, "-m", "moral_rl.main",
            "--config=configs/ipd.py:utilitarian,smoke",
            f"--config.model.name={folder}", "--config.num_updates=30",
            "--config.lora.rank=2", "--config.checkpoint_every=1",
            "--config.figure_every=2", f"--workdir={workdir}", *extra]


@pytest.mark.slow
def test_sigkill_and_resume_match_uninterrupted(uninterrupted, tiny_folder,
                                                tmp_path):
    _, expected = uninterrupted
    workdir = str(tmp_path / "killed")
    env = dict(os.environ, PYTHONPATH=ROOT)

    process = subprocess.Popen(_main_command(tiny_folder, workdir), cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint_3 = os.path.join(workdir, "checkpoints", "3")
    deadline = time.time() + 600
    while not os.path.isdir(checkpoint_3) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))

    subprocess.run(_main_command(tiny_folder, workdir, "--resume"), cwd=ROOT,
                   env=env, check=True, capture_output=True)

    with open(os.path.join(workdir, "final_metrics.json")) as f:
        resumed = json.load(f)
    assert resumed["step"] == 30
    for name, values in expected.items():
        np.testing.assert_allclose(resumed["metrics"][name], values,
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(31))


def test_resume_without_checkpoint_raises(tmp_path):
    config = ipd.get_config("utilitarian,smoke")

    with pytest.raises(FileNotFoundError, match="--resume"):
        train.train_and_evaluate(config, str(tmp_path), resume=True)


@pytest.mark.slow
def test_utilitarian_run_raises_cooperation(tmp_path):
    """Four updates on the embedded model, the main job's settings else.

    The untuned SmolLM2-135M-Instruct answers legally with probability
    below 0.1% on these prompts, so cooperating in a fifth of the games is
    a clear margin; the full 12-update run reaches over 90%.
    """
    config = ipd.get_config("utilitarian")
    config.num_updates = 4

    metrics = train.train_and_evaluate(config, str(tmp_path))

    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        untuned = json.loads(f.readline())
    assert untuned["reference/p_cooperate"] < 0.01
    assert metrics["policy/p_cooperate"][0] > 0.2
    assert metrics["actions/cooperation"][0] > 0.2
    assert (metrics["policy/p_cooperate"][0]
            > 20 * untuned["reference/p_cooperate"])

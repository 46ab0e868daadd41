"""Kill and resume: chain resume, a real kill -9, Ctrl-C, and resumes with a changed config.

Resumed results are compared with the uninterrupted chain of the same seed bit for bit
(every tensor of the final weights, and the stage's metrics).
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import read_manifest
from pipeline.tracking import Tracker
from tests.faults.helpers import (
    chain_args,
    cli,
    error_line,
    fingerprint,
    incomplete,
    kill_after_checkpoint,
    same_weights,
)

REPO = Path(__file__).resolve().parents[2]
TIMING = ("seconds", "time", "per_s", "tokens_per_s", "update_", "generate_", "score_",
          "train_start", "train_end")


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def test_chain_resume_reruns_a_stage_killed_without_checkpoint(finished, tmp_path, capsys):
    """Killed while label ran (label keeps no checkpoints): label runs again from the start,
    and rm, ppo and eval, which never started, start fresh."""
    root, run = tmp_path / "runs", tmp_path / "runs" / "c"
    shutil.copytree(finished / "done" / "sft", run / "sft")
    (run / "label").mkdir()
    shutil.copy(finished / "done" / "label" / "config.yaml", run / "label")
    code, out, err = cli(capsys, "pipeline", *chain_args(root, "c"), "run.resume=true")
    assert code == 0, err
    assert "[sft] already complete, skipped" in out
    assert "[label] no checkpoint to resume from: starting it from the beginning" in out
    for stage in ("label", "rm", "ppo", "eval"):
        assert not incomplete(run / stage), stage
    assert (run / "report.html").is_file()
    done = finished / "done"
    assert (run / "label" / "data.jsonl").read_bytes() == (done / "label" / "data.jsonl").read_bytes()
    same_weights(run / "ppo" / "model", done / "ppo" / "model")


@pytest.mark.parametrize("killed", ["rm", "ppo"])
def test_chain_resume_continues_the_killed_stage_from_its_checkpoint(finished, tmp_path, capsys,
                                                                     killed):
    root, run, done = tmp_path / "runs", tmp_path / "runs" / "c", finished / "done"
    order = ("sft", "label", "rm", "ppo")
    for stage in order[: order.index(killed)]:
        shutil.copytree(done / stage, run / stage)
    assert cli(capsys, killed, *chain_args(root, "c"))[0] == 0
    kill_after_checkpoint(run / killed)
    code, out, err = cli(capsys, "pipeline", *chain_args(root, "c"), "run.resume=true")
    assert code == 0, err
    assert f"[{killed}] no checkpoint" not in out
    for stage in order[order.index(killed):]:
        same_weights(run / stage / "model", done / stage / "model")
        assert untimed(read_manifest(run / stage)["metrics"]) \
            == untimed(read_manifest(done / stage)["metrics"]), stage


def test_kill_9_after_a_checkpoint_then_resume_is_bit_exact(tmp_path, capsys):
    """A real SIGKILL at a random moment after the first checkpoint, then run.resume=true."""
    root = tmp_path / "runs"
    args = [*chain_args(root, "k9"), "sft.max_steps=40", "sft.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sft", *args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = root / "k9" / "sft" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    stage = root / "k9" / "sft"
    assert proc.returncode == -9 and latest.is_file() and incomplete(stage), \
        "the run ended before it could be killed"
    code, _, err = cli(capsys, "sft", *args, "run.resume=true")
    assert code == 0, err
    assert cli(capsys, "sft", *chain_args(root, "straight"), "sft.max_steps=40",
               "sft.save_every=2")[0] == 0
    straight = root / "straight" / "sft"
    same_weights(stage / "model", straight / "model")
    assert untimed(read_manifest(stage)["metrics"]) == untimed(read_manifest(straight)["metrics"])


def _interrupt_at_step(monkeypatch, at: int) -> None:
    """Ctrl-C as the stage logs training step ``at`` (after the step-2 checkpoint)."""
    real = Tracker.log

    def log(self, metrics, step):
        if step == at and "train/loss" in metrics:
            raise KeyboardInterrupt
        return real(self, metrics, step=step)

    monkeypatch.setattr(Tracker, "log", log)


def _one_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


def test_ctrl_c_in_a_chain_prints_the_resume_command_and_it_works(finished, tmp_path, capsys,
                                                                  monkeypatch):
    root = tmp_path / "runs"
    _interrupt_at_step(monkeypatch, 3)
    code, _, err = cli(capsys, "pipeline", *chain_args(root, "i"))
    assert code == 130
    stage = root / "i" / "sft"
    line = _one_line(err, "interrupted")
    assert line.startswith(f"interrupted: sft was not marked complete; last checkpoint "
                           f"{stage}/checkpoints/step-0000002; resume with: rlhf pipeline ")
    assert incomplete(stage)
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["rlhf", "pipeline"] and command[-1] == "run.resume=true"
    monkeypatch.undo()
    code, _, err = cli(capsys, *command[1:])
    assert code == 0, err
    for name in ("sft", "ppo"):
        same_weights(root / "i" / name / "model", finished / "done" / name / "model")


def test_ctrl_c_without_a_checkpoint_says_to_run_again(tmp_path, capsys, monkeypatch):
    root = tmp_path / "runs"
    _interrupt_at_step(monkeypatch, 3)
    code, _, err = cli(capsys, "sft", *chain_args(root, "i"), "sft.save_every=0")
    assert code == 130
    line = _one_line(err, "interrupted")
    assert "has no checkpoint to resume from; run it again with: rlhf sft " in line
    assert "run.resume" not in line
    assert incomplete(root / "i" / "sft")


def test_resume_without_a_checkpoint(tmp_path, capsys):
    code, _, err = cli(capsys, "sft", *chain_args(tmp_path / "runs", "r"), "run.resume=true")
    assert code == 1
    error_line(err, r"run\.resume=true but .*/r/sft/checkpoints holds no checkpoint to resume "
                    r"from \(run without run\.resume to start the stage from the beginning\)")
    assert incomplete(tmp_path / "runs" / "r" / "sft")


def test_resume_with_changed_training_keys_is_refused(killed_sft, capsys):
    root, name = killed_sft
    stage = root / name / "sft"
    before = fingerprint(stage)
    code, _, err = cli(capsys, "sft", *chain_args(root, name), "run.resume=true",
                       "sft.lr=1e-3", "sft.batch_size=2")
    assert code == 1
    error_line(err, rf"^error: sft: run\.resume=true with a config that differs from the one "
                    rf"{stage}/checkpoints/step-0000002 was written under \(sft\.batch_size: "
                    r"4 -> 2; sft\.lr: 0\.003 -> 0\.001\); resume with those values")
    assert fingerprint(stage) == before
    assert incomplete(stage)


def test_resume_with_allowed_changes_takes_them(killed_sft, capsys):
    """A longer budget, other logging, and another stage's keys: allowed, and the new budget
    is the one trained to."""
    root, name = killed_sft
    stage = root / name / "sft"
    code, _, err = cli(capsys, "sft", *chain_args(root, name), "run.resume=true",
                       "sft.max_steps=6", "sft.log_every=2", "ppo.lr=1e-4",
                       "tracking.progress=true")
    assert code == 0, err
    assert read_manifest(stage)["metrics"]["steps"] == 6
    assert "max_steps: 6" in (stage / "config.yaml").read_text()


def test_resume_with_a_budget_behind_the_checkpoint_is_refused(killed_sft, capsys):
    root, name = killed_sft
    stage = root / name / "sft"
    before = fingerprint(stage)
    code, _, err = cli(capsys, "sft", *chain_args(root, name), "run.resume=true",
                       "sft.max_steps=1")
    assert code == 1
    error_line(err, r"sft: the checkpoint is at step 2, past the new budget of 1 steps "
                    r"\(sft\.max_steps\)")
    assert fingerprint(stage) == before

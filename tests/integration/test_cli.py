"""The `rlhf` command line: status output and a real 2-process DDP run under accelerate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def test_status_lists_stage_and_metrics(tiny_sft_run, capsys):
    run_dir = tiny_sft_run.parent
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tiny_sft_run / "manifest.json").read_text())["metrics"]
    assert f"run {run_dir}" in out
    assert "sft" in out and "complete" in out
    for key in ("eval_loss_before", "eval_loss_after", "steps", "world_size"):
        assert key in out
    assert f"steps = {metrics['steps']}" in out
    assert f"eval_loss_after = {metrics['eval_loss_after']:.4g}" in out


def test_status_incomplete_and_missing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "sft" / "checkpoints").mkdir(parents=True)
    (run_dir / "sft" / "checkpoints" / "latest").write_text("step-0000002\n")
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "incomplete" in out and "step-0000002" in out
    assert main(["status", str(tmp_path / "nope")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    assert main(["status"]) == 2


def test_cli_refuses_complete_stage_with_exit_1(tiny_sft_run, capsys):
    assert main(["sft", "--config", str(tiny_sft_run / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert "already complete" in err and str(tiny_sft_run) in err


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")
def test_two_process_ddp_sft(tiny_overrides, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "PYTHONPATH": str(REPO)}
    cmd = [str(ACCELERATE), "launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
           "-m", "pipeline.cli", "sft", "--config", str(REPO / "configs" / "quick.yaml"),
           *tiny_overrides, "run.name=ddp", "sft.max_steps=2",
           # Cosine to zero over 2 steps: the last logged lr is 0 only if the schedule is
           # stepped once per optimizer step, not once per process.
           "sft.lr_scheduler=cosine", "sft.warmup_ratio=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stage = tmp_path / "runs" / "ddp" / "sft"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["steps"] == 2
    assert (stage / "model" / "model.safetensors").is_file()
    logged = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in logged if "train/lr" in r]
    assert lrs == pytest.approx([1.5e-3, 0.0], abs=1e-9)
    # Only rank 0 writes: one row per step, not one per process.
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2]
    assert "[sft] complete" in proc.stdout


def test_pipeline_resume_skips_finished_stages(tiny_sft_run, tmp_path, capsys):
    """`rlhf pipeline run.resume=true` after a kill continues where it stopped."""
    import shutil

    run = tmp_path / "runs" / "r"
    shutil.copytree(tiny_sft_run, run / "sft")

    # label is the first unfinished stage; with no checkpoint it runs from the start, and a
    # judge that raises makes it stop there with exit 1.
    code = main(["pipeline", "--config", str(REPO / "configs" / "quick.yaml"),
                 f"run.root={tmp_path / 'runs'}", "run.name=r", "run.resume=true",
                 "label.judge=tests.faults.user_code:judge_raises"])
    out = capsys.readouterr()
    assert "[sft] already complete, skipped" in out.out
    assert code == 1 and "judge_raises" in out.err


def test_stage_run_with_stderr_to_a_file_prints_interval_lines(tmp_path):
    """`rlhf sft ... 2> log`: one line per logging interval, none of the libraries' noise."""
    from tests.conftest import tiny_override_list

    log = tmp_path / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("CI", None)
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "sft", *tiny_override_list(tmp_path / "runs"),
             "sft.log_every=2", "tracking.progress=true"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    pattern = r"\[sft\] step (\d+)/4  loss \d+\.\d+  (eta|took) \d+s"
    assert all(re.fullmatch(pattern, line) for line in lines), text
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [2, 4]
    assert "took" in lines[-1]
    # transformers' save bar (model/), and its deprecation warning for the cache argument
    # that generation (samples.jsonl) used to trigger.
    for noise in ("Writing model shards", "past_key_values", "Warning"):
        assert noise not in text

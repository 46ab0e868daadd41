"""metrics.jsonl always; wandb (offline, no key) and tensorboard when enabled."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.tracking import Tracker


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_wandb_offline_and_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t", "tracking.wandb=true",
                             "tracking.tensorboard=true"])
    stage = tmp_path / "t" / "sft"
    tracker = Tracker(cfg, "sft", stage)
    tracker.log({"train/loss": 1.5, "train/lr": 1e-4}, step=1)
    tracker.log({"train/loss": 1.0, "nan_metric": float("nan")}, step=2)
    tracker.log_table("samples", [{"prompt": "p", "response": "r | s"}], step=2)
    tracker.summary({"eval_loss_after": 1.0})
    tracker.close()

    logged = rows(stage / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2]
    assert logged[1]["train/loss"] == 1.0 and logged[1]["nan_metric"] == "nan"
    assert list((stage / "tensorboard").glob("events.out.tfevents.*"))
    offline = list((stage / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t"])
    stage = tmp_path / "t" / "ppo"
    tracker = Tracker(cfg, "ppo", stage)
    for step in range(1, 6):
        tracker.log({"x": step}, step=step)
    resumed = Tracker(cfg, "ppo", stage, resume_step=3)
    resumed.log({"x": 4.5}, step=4)
    assert [(r["step"], r["x"]) for r in rows(stage / "metrics.jsonl")] == [
        (1, 1), (2, 2), (3, 3), (4, 4.5)]
    # A fresh (non-resumed) start replaces the old file.
    Tracker(cfg, "ppo", stage).log({"x": 0}, step=1)
    assert len(rows(stage / "metrics.jsonl")) == 1


def test_non_main_process_writes_nothing(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t", "tracking.tensorboard=true"])
    stage = tmp_path / "t" / "sft"
    tracker = Tracker(cfg, "sft", stage, is_main=False)
    tracker.log({"x": 1}, step=1)
    tracker.close()
    assert not stage.exists()

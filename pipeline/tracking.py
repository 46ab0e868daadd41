"""Metrics go to ``metrics.jsonl`` always, and to wandb / tensorboard when enabled.

Stages only see ``Tracker``; they never import wandb. wandb runs offline unless the user sets
``tracking.wandb_mode=online`` (a missing API key would otherwise fail at init); offline runs
are synced later with ``wandb sync``. Runs of one pipeline share a wandb group (the run name),
with one job type per stage.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, to_dict


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    def __init__(self, cfg: Config, stage: str, stage_path: Path, is_main: bool = True,
                 resume_step: int | None = None):
        self.is_main = is_main
        self.path = stage_path / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not is_main:
            return
        stage_path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop rows logged after the checkpoint so the resumed curve has no duplicates.
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        t = cfg.tracking
        if t.wandb and t.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=t.wandb_project,
                entity=t.wandb_entity,
                group=cfg.run.name,
                job_type=stage,
                name=f"{cfg.run.name}-{stage}",
                dir=str(stage_path),
                mode=t.wandb_mode,
                config=to_dict(cfg),
                reinit="finish_previous",
            )
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(stage_path / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "time"}, step=step)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        """Sample tables: a wandb Table and tensorboard text (samples.jsonl is the stage's job)."""
        if not self.is_main or not rows:
            return
        columns = list(rows[0])
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self._wandb.log({name: table}, step=step)
        if self._tb is not None:
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join(
                "| " + " | ".join(str(r.get(c)).replace("|", "/").replace("\n", " ")
                                  for c in columns) + " |\n"
                for r in rows
            )
            self._tb.add_text(name, header + body, step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in metrics.items():
                self._wandb.summary[k] = _jsonable(v)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

"""Every stage's life: check -> start -> body -> finish.

A stage is a ``Stage`` subclass, and its module's entry point is ``run(cfg) -> Path``, which
runs ``TheStage(cfg).run()``:

  check   everything that can refuse the run: the finished folder it would replace, a resume
          checkpoint that no longer fits, the parents (present, complete, of the right stage,
          trained with the same tokenizer), the data files, the reward terms and user code.
          Nothing on disk changes, so a refused run leaves the folder as it was.
  start   the stage folder cleared (a fresh start or run.overwrite) with its config.yaml
          written, and the tracker opened.
  body    the stage's own work; returns its ``Outcome``.
  finish  the tracker's summary, then the manifest, written last; every process waits for it,
          so a caller on any rank can read it.

The shape is torchtune's recipes (setup / train / cleanup behind a short entry point), with the
pipeline's typed config, ``StageDir`` and manifests.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import Config
from pipeline.models import load_policy, tokenizer_sha256
from pipeline.rundir import (
    Parent,
    StageDir,
    check_same_tokenizer,
    open_parent,
    read_manifest,
    stage_dir,
)
from pipeline.runtime import make_accelerator
from pipeline.tracking import Tracker
from pipeline.training import Guard, checkpoint_step, resume_checkpoint


@dataclass
class Outcome:
    """What a stage's body leaves for its manifest."""

    metrics: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One stage of a run (see the module docstring). Subclasses set ``name`` and write
    ``check`` (calling this one's first) and ``body``."""

    # The stage's folder under the run, as the command line names it.
    name: ClassVar[str]
    # What the numerics guard calls one step ("update" for PPO).
    unit: ClassVar[str] = "step"
    # Keeps checkpoints that run.resume continues from.
    resumable: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accelerator = None
        self.parents: dict[str, Parent] = {}
        self._keys: dict[str, str] = {}
        self.base_model: str | None = None
        self.tokenizer_sha256: str | None = None
        self.resume_from: Path | None = None

    def run(self) -> Path:
        self.started = time.time()
        self.check()
        self.start()
        return self.finish(self.body())

    # --- check ------------------------------------------------------------------------------

    def check(self) -> None:
        """The process set up, and the folder and resume checkpoint checked."""
        self.accelerator = self.make_accelerator()
        self.stage = StageDir(self.cfg, self.name, self.is_main)
        self.stage.check()
        if self.resumable:
            self.resume_from = resume_checkpoint(self.stage, self.cfg)
        self.guard = Guard(self.name, self.stage.checkpoints, unit=self.unit)

    def make_accelerator(self):
        """This process's Accelerator (it pins the threads and seeds the RNGs)."""
        return make_accelerator(self.cfg)

    @property
    def is_main(self) -> bool:
        if self.accelerator is None:
            return int(os.environ.get("RANK", "0")) == 0
        return self.accelerator.is_main_process

    def consume(self, role: str, parent: Parent | None, key: str) -> Parent | None:
        """Record a parent (the manifest's ``parents[role]``; ``key`` is the config key that
        locates it, for errors). ``adopt_tokenizer`` checks it."""
        if parent is not None:
            self.parents[role] = parent
            self._keys[role] = key
        return parent

    def open(self, role: str, stage: str, override: str, key: str,
             optional: bool = False) -> Parent | None:
        """Open and record the finished ``stage`` at ``override`` (or the run's own). An
        optional one that is simply absent is None; one that is there must be complete."""
        path = stage_dir(self.cfg, stage, override)
        if optional and not override and not path.exists():
            return None
        return self.consume(role, open_parent(path, stage, key), key)

    def adopt_tokenizer(self, tok) -> None:
        """The stage's tokenizer: every parent recorded so far must have been trained with it
        (a manifest that does not describe its own model/ is refused too)."""
        self.tokenizer_sha256 = tokenizer_sha256(tok)
        for role, parent in self.parents.items():
            check_same_tokenizer(self.tokenizer_sha256, parent, self._keys[role])

    def load_policy(self, parent: Parent):
        """(model, tokenizer) of the policy ``parent`` trained; its tokenizer becomes the
        stage's (``adopt_tokenizer``) and its base model the stage's."""
        model, tok = load_policy(self.cfg.model, seed=self.cfg.run.seed,
                                 name_or_path=str(parent.model_dir))
        self.adopt_tokenizer(tok)
        self.base_model = parent.manifest["base_model"]
        return model, tok

    # --- start ------------------------------------------------------------------------------

    def start(self) -> None:
        self.stage.start()
        resume_step = checkpoint_step(self.resume_from) if self.resume_from else None
        self.tracker = Tracker(self.cfg, self.name, self.stage.path, self.is_main,
                               resume_step=resume_step)

    # --- body -------------------------------------------------------------------------------

    def body(self) -> Outcome:
        raise NotImplementedError

    # --- finish -----------------------------------------------------------------------------

    def finish(self, outcome: Outcome) -> Path:
        self.tracker.summary(outcome.metrics)
        self.tracker.close()
        path = self.stage.finish(metrics=outcome.metrics, extras=outcome.extras,
                                 parents=self.parents, base_model=self.base_model,
                                 tokenizer_sha256=self.tokenizer_sha256)
        self.wait()
        return path

    def wait(self) -> None:
        """All processes meet here (a no-op in one process)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def done(self, path: Path) -> str:
        """What the command line prints once the stage finished at ``path``."""
        manifest = read_manifest(path) or {}
        return (f"[{self.name}] complete: {path}\n"
                f"[{self.name}] metrics: {json.dumps(manifest.get('metrics', {}))}")

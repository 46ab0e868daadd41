"""Run directories, manifests and the stage handoff.

``runs/<run.name>/<stage>/`` holds a stage's output. Its ``manifest.json`` is written last and
atomically, with ``status: "complete"``; a stage that dies leaves none, so a later stage can never
consume something half-written. Parents are opened by explicit path and checked.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, config_sha256, to_yaml
from pipeline.errors import PipelineError
from pipeline.files import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    read_manifest,
)

SCHEMA = "rlhf-pipeline/manifest/v1"
STAGES = ("sft", "label", "rm", "ppo", "dpo", "eval")


def git_sha() -> str | None:
    """The commit of the code that produced a stage (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=here, capture_output=True, text=True, timeout=5,
    ).stdout.strip()
    return sha + ("-dirty" if dirty else "")


@dataclass(frozen=True)
class Parent:
    """A finished stage that another stage consumes."""

    path: Path
    manifest: dict
    manifest_sha256: str

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def extras(self) -> dict:
        return self.manifest.get("extras", {})

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def ref(self) -> dict:
        return {"path": str(self.path), "manifest_sha256": self.manifest_sha256}


def ppo_algorithm(manifest: dict) -> dict:
    """How a PPO stage estimated its advantages, from its manifest, with a short label for
    tables and plots. Manifests from before the estimator was a choice were gae with one
    response per prompt and the KL in the reward."""
    extras = manifest.get("extras", {})
    estimator = extras.get("advantage_estimator", "gae")
    k = extras.get("samples_per_prompt", 1)
    kl_in = extras.get("kl_in", "reward")
    dr_grpo = estimator == "grpo" and not extras.get("grpo_std_normalize", True)
    name = "dr_grpo" if dr_grpo else estimator
    label = name + (f", k={k}" if k > 1 else "") + (", KL in loss" if kl_in == "loss" else "")
    return {"advantage_estimator": estimator, "samples_per_prompt": k, "kl_in": kl_in,
            "critic": extras.get("critic", estimator == "gae"), "label": label}


def open_parent(path: str | Path, expected_stage: str | tuple[str, ...], role: str) -> Parent:
    """Open a finished stage; refuse a missing, incomplete or wrong-type one with one line."""
    path = Path(path)
    expected = (expected_stage,) if isinstance(expected_stage, str) else expected_stage
    want = " or ".join(expected)
    if not path.is_dir():
        raise PipelineError(f"{role}: {path} does not exist (run the {want} stage first)")
    manifest = read_manifest(path)
    if manifest is None:
        raise PipelineError(
            f"{role}: {path} has no {MANIFEST}; the {want} stage did not finish (re-run it)"
        )
    if manifest.get("schema") != SCHEMA:
        raise PipelineError(f"{role}: {path}/{MANIFEST} has schema {manifest.get('schema')!r}, "
                            f"expected {SCHEMA!r}")
    if manifest.get("status") != "complete":
        raise PipelineError(f"{role}: {path} has status {manifest.get('status')!r}, "
                            "expected 'complete' (re-run that stage)")
    if manifest.get("stage") not in expected:
        raise PipelineError(
            f"{role}: {path} is a {manifest.get('stage')!r} stage, expected {want}"
        )
    return Parent(path, manifest, file_sha256(path / MANIFEST))


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``folder/latest`` points to, or None when there is none."""
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    return path if path.is_dir() else None


def check_same_tokenizer(policy_sha: str, other: Parent, role: str) -> None:
    theirs = other.manifest.get("tokenizer_sha256")
    if theirs != policy_sha:
        raise PipelineError(
            f"{role}: {other.path} was trained with a different tokenizer "
            f"(sha256 {str(theirs)[:12]}… vs the policy's {policy_sha[:12]}…); "
            "the policy and reward model must share one tokenizer"
        )


class StageDir:
    """The folder of one stage of one run: created at start, sealed by the manifest at the end.

    Only the main process writes; other processes get the same paths.
    """

    def __init__(self, cfg: Config, stage: str, is_main: bool = True):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.cfg = cfg
        self.stage = stage
        self.is_main = is_main
        self.path = cfg.run_dir / stage
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.samples_path = self.path / "samples.jsonl"

    def check(self) -> None:
        """Refuse to clobber a finished stage. Side-effect free: stages call it before they
        read their inputs, and ``start`` calls it again before clearing anything."""
        existing = read_manifest(self.path) if self.path.is_dir() else None
        if existing is not None and existing.get("status") == "complete":
            if self.cfg.run.resume:
                raise PipelineError(
                    f"{self.path} is already complete; nothing to resume "
                    "(use run.overwrite=true to train it again)"
                )
            if not self.cfg.run.overwrite:
                raise PipelineError(
                    f"{self.path} is already complete; pass run.overwrite=true to replace it "
                    "or choose another run.name"
                )
        if self.path.exists() and not self.path.is_dir():
            raise PipelineError(f"{self.path}: exists and is not a folder")
        # Imported here: the hub module loads torch and transformers, which the commands that
        # only read run folders (status, config) do without.
        from pipeline.hub import check_push

        check_push(self.cfg.run)

    def start(self) -> None:
        """Clear the folder (on overwrite, or an unfinished fresh start) and write the resolved
        config. Every stage calls it only once its inputs have been read and checked, so a
        bad input never costs the finished stage it would have replaced."""
        self.check()
        if self.is_main:
            try:
                if self.path.exists() and not self.cfg.run.resume:
                    # The manifest goes first so an interrupted clean-up never looks complete.
                    (self.path / MANIFEST).unlink(missing_ok=True)
                    shutil.rmtree(self.path)
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PipelineError(f"{self.path}: cannot create the stage folder "
                                    f"({exc.strerror or exc})") from None
            atomic_write_text(self.path / "config.yaml", to_yaml(self.cfg))

    def finish(
        self,
        *,
        metrics: dict[str, Any],
        extras: dict[str, Any] | None = None,
        parents: dict[str, Parent] | None = None,
        base_model: str | None = None,
        tokenizer_sha256: str | None = None,
    ) -> Path:
        """Seal the stage: the manifest is the last file written.

        A stage that saved a ``model/`` gets its model card first; with ``run.push_to_hub``
        that folder is uploaded once the stage is sealed, so a failed upload never costs
        the trained model."""
        if self.is_main:
            manifest = {
                "schema": SCHEMA,
                "stage": self.stage,
                "status": "complete",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "run": self.cfg.run.name,
                "git_sha": git_sha(),
                "config_sha256": config_sha256(self.cfg),
                "parents": {name: p.ref() for name, p in (parents or {}).items()},
                "base_model": base_model,
                "tokenizer_sha256": tokenizer_sha256,
                "metrics": metrics,
                "extras": extras or {},
            }
            model_dir = self.path / "model"
            publish = (model_dir / "config.json").is_file()
            if publish:
                from pipeline import hub

                atomic_write_text(model_dir / hub.CARD, hub.model_card(self.path, manifest,
                                                                       self.cfg))
            atomic_write_json(self.path / MANIFEST, manifest)
            if publish and self.cfg.run.push_to_hub:
                url = hub.push_model(model_dir, self.stage, self.cfg.run)
                print(f"[{self.stage}] pushed {model_dir} to {url}", flush=True)
        return self.path

    def write_jsonl(self, path: Path, rows: list[dict]) -> None:
        if self.is_main:
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def stage_dir(cfg: Config, stage: str, override: str | None) -> Path:
    """A parent's folder: the explicit path if the user gave one, else the same run's stage."""
    return Path(override) if override else cfg.run_dir / stage

"""``rlhf <stage> [--config FILE.yaml] [key=value ...]`` and ``rlhf status RUN_DIR``.

Exit codes: 0 done, 1 a run/data problem (one line naming the file or stage), 2 a bad
configuration (every bad key listed), 130 interrupted (Ctrl-C: one line with the command that
resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import sys
from pathlib import Path

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.data import DataError
from pipeline.errors import PipelineError
from pipeline.rundir import STAGES, latest_checkpoint, read_manifest

# stage command -> module in stages/
STAGE_MODULES = {"sft": "stages.sft", "label": "stages.label", "rm": "stages.reward",
                 "ppo": "stages.ppo", "dpo": "stages.dpo", "eval": "stages.evaluate",
                 "report": "stages.report"}

USAGE = f"""rlhf COMMAND [--config FILE.yaml] [key=value ...]

commands:
  {' | '.join(STAGE_MODULES)}    run one stage
  pipeline             run the stages of pipeline.stages in order (default:
                       {' -> '.join(PipelineConfig().stages)}; add dpo to
                       train DPO on the same rankings, as configs/compare.yaml does)
  seeds                SFT once, then the rest of pipeline.stages per seed in run.seeds
                       (run.seed_jobs at a time); one table of the outcomes
  status RUN_DIR       lineage, status and metrics of each stage of a run

examples:
  rlhf sft --config configs/quick.yaml sft.lr=1e-4 run.name=exp1
  rlhf status runs/exp1
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", usage=USAGE, add_help=True)
    p.add_argument("command", choices=[*STAGE_MODULES, "pipeline", "seeds", "status"])
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    p.add_argument("rest", nargs="*", help="key=value overrides (or RUN_DIR for status)")
    return p


def run_stage(name: str, cfg) -> Path:
    module = importlib.import_module(STAGE_MODULES[name])
    return module.run(cfg)


def resume_plan(cfg, name: str):
    """How ``rlhf pipeline run.resume=true`` runs one stage: (config, note or None).

    A stage killed after a checkpoint resumes from it; one with no checkpoint (never started,
    killed before its first save, or a stage that keeps none, like label) starts fresh.
    """
    if latest_checkpoint(cfg.run_dir / name / "checkpoints") is not None:
        return cfg, None
    fresh = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=False))
    note = (f"[{name}] no checkpoint to resume from: starting it from the beginning"
            if (cfg.run_dir / name).is_dir() else None)
    return fresh, note


def interrupted(command: str, config: str | None, overrides: list[str], cfg,
                stage: str | None) -> str:
    """The one line printed on Ctrl-C: where the stage stands and the command that resumes."""
    kept = [o for o in overrides
            if o.split("=", 1)[0].strip() not in ("run.resume", "run.overwrite")]
    again = ["rlhf", command, *(["--config", config] if config else []), *kept]
    if stage is None:
        return f"interrupted before any stage started; run again: {shlex.join(again)}"
    folder = cfg.run_dir / stage
    done = read_manifest(folder) if stage in STAGES and folder.is_dir() else None
    if done is not None and done.get("status") == "complete":
        # Stopped before the stage changed anything (or between stages).
        if command == "pipeline":
            return (f"interrupted: {stage} is complete and unchanged; continue with: "
                    f"{shlex.join([*again, 'run.resume=true'])}")
        return f"interrupted before {stage} changed anything: {folder} is still complete"
    latest = latest_checkpoint(folder / "checkpoints")
    if latest is not None:
        return (f"interrupted: {stage} was not marked complete; last checkpoint {latest}; "
                f"resume with: {shlex.join([*again, 'run.resume=true'])}")
    if command == "pipeline":
        return (f"interrupted: {stage} was not marked complete and has no checkpoint (it "
                f"restarts); continue with: {shlex.join([*again, 'run.resume=true'])}")
    return (f"interrupted: {stage} was not marked complete and has no checkpoint to resume "
            f"from; run it again with: {shlex.join(again)}")


def status(run_dir: Path) -> int:
    if not run_dir.is_dir():
        print(f"error: {run_dir}: no such run folder", file=sys.stderr)
        return 1
    print(f"run {run_dir}")
    found = False
    for stage in STAGES:
        path = run_dir / stage
        if not path.is_dir():
            continue
        found = True
        manifest = read_manifest(path)
        if manifest is None:
            state = "incomplete (no manifest)"
            if (path / "checkpoints" / "latest").is_file():
                state += f", resumable from {(path / 'checkpoints' / 'latest').read_text().strip()}"
            print(f"  {stage:6s} {state}")
            continue
        print(f"  {stage:6s} {manifest['status']}  {manifest['created']}  "
              f"git {str(manifest.get('git_sha'))[:12]}")
        for role, ref in manifest.get("parents", {}).items():
            print(f"         <- {role}: {ref['path']} (manifest {ref['manifest_sha256'][:12]})")
        for key, value in manifest.get("metrics", {}).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                shown = f"{value:.4g}" if isinstance(value, float) else value
                print(f"         {key} = {shown}")
    if not found:
        print("  (no stages yet)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.command == "status":
        if len(args.rest) != 1:
            print("error: usage: rlhf status RUN_DIR", file=sys.stderr)
            return 2
        return status(Path(args.rest[0]))
    # "module:function" names resolve against the working directory, as under `python -m`
    # (a console script's path lacks it); config validation imports them.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        cfg = load_config(args.config, args.rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.command == "seeds":
        from pipeline import seeds

        try:
            seeds.run(cfg, args.config, args.rest)
        except (PipelineError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    stages = cfg.pipeline.stages if args.command == "pipeline" else (args.command,)
    main_process = os.environ.get("RANK", "0") == "0"
    current = None
    try:
        for name in stages:
            current = name
            done = read_manifest(cfg.run_dir / name) if name in STAGES else None
            stage_cfg = cfg
            if args.command == "pipeline" and cfg.run.resume:
                if done is not None and done.get("status") == "complete":
                    # Resuming a pipeline continues the stage that was killed, not the
                    # finished ones.
                    if main_process:
                        print(f"[{name}] already complete, skipped: {cfg.run_dir / name}")
                    continue
                stage_cfg, note = resume_plan(cfg, name)
                if note and main_process:
                    print(note)
            path = run_stage(name, stage_cfg)
            if os.environ.get("RANK", "0") != "0":
                continue
            if name == "report":
                print(f"[report] written: {path / 'report.html'}")
                continue
            manifest = read_manifest(path) or {}
            print(f"[{name}] complete: {path}\n"
                  f"[{name}] metrics: {json.dumps(manifest.get('metrics', {}))}")
    except (PipelineError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if main_process:
            print(interrupted(args.command, args.config, args.rest, cfg, current),
                  file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

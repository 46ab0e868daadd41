"""``rlhf <stage> [--config FILE|NAME] [key=value ...]``, ``rlhf status RUN_DIR``, ``rlhf compare
RUN_DIR ...``, ``rlhf config show|validate`` and ``rlhf configs ls|cp``; ``rlhf COMMAND --help``
lists the keys a command reads.

Exit codes: 0 done, 1 a run/data problem (one line naming the file or stage), 2 a bad
configuration (every bad key listed) or command line, 130 interrupted (Ctrl-C: one line with
the command that resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import textwrap
from pathlib import Path

from pipeline import keydoc, shipped
from pipeline.callables import import_callable
from pipeline.config import ConfigError, PipelineConfig, load_config, to_yaml
from pipeline.data import DataError
from pipeline.errors import PipelineError
from pipeline.rundir import STAGES, latest_checkpoint, read_manifest

# stage command -> its pipeline.lifecycle.Stage, imported when the stage runs
STAGE_CLASSES = {"sft": "stages.sft:SFT", "label": "stages.label:Label",
                 "rm": "stages.reward:RewardModel", "ppo": "stages.ppo:PPO",
                 "dpo": "stages.dpo:DPO", "eval": "stages.evaluate:Eval",
                 "report": "stages.report:Report"}
RUN_COMMANDS = (*STAGE_CLASSES, "pipeline", "seeds", "scaling")
COMMANDS = (*RUN_COMMANDS, "status", "compare", "config", "configs")

USAGE = f"""usage: rlhf COMMAND [--config FILE|NAME] [key=value ...]

commands:
  {' | '.join(STAGE_CLASSES)}    run one stage
  pipeline             run the stages of pipeline.stages in order (default:
                       {' -> '.join(PipelineConfig().stages)}; add dpo to
                       train DPO on the same rankings, as configs/compare.yaml does)
  seeds                SFT once, then the other stages of pipeline.stages per seed in
                       run.seeds (run.seed_jobs at a time); one table of the outcomes
  scaling              predict the SFT loss and reward-model accuracy from small runs,
                       then train the full-size stages and check; overoptimization fits
  status RUN_DIR       lineage, status and metrics of each stage of a run
  compare RUN_DIR ...  finished runs side by side: one table, gold vs KL, win rates
  config show          print the resolved config (defaults <- --config <- key=value) as YAML
  config validate      check a config and its overrides without running anything
  configs ls           list the shipped configs
  configs cp NAME DEST copy a shipped config, to edit it

`rlhf COMMAND --help` lists the keys COMMAND reads with their type, default and meaning.
--config takes a YAML file or the name of a shipped config (`rlhf configs ls`).

examples:
  rlhf sft --config quick sft.lr=1e-4 run.name=exp1
  rlhf ppo --help
  rlhf config validate --config default ppo.kl_coef=0.05
  rlhf status runs/exp1
  rlhf compare runs/a-seed0 runs/a-seed1 runs/b-seed0 --out runs/a-vs-b
"""

_RUN_SUMMARY = {
    "pipeline": ("Run the stages of pipeline.stages in order (default: "
                 f"{' -> '.join(PipelineConfig().stages)}; add dpo to train DPO on the same "
                 "rankings)."),
    "seeds": "SFT once, then the other stages of pipeline.stages for each seed in run.seeds.",
    "report": "One self-contained HTML page of a run's plots and tables: <run>/report.html.",
    "scaling": ("Fit small SFT and reward-model runs, record what they predict for the full "
                "run, train it and check (<run>/scaling.json; scaling.* keys)."),
}
_USAGE = {
    "status": "rlhf status RUN_DIR",
    "compare": "rlhf compare RUN_DIR [RUN_DIR ...] [--out DIR] [--group-by estimator|policy]",
    "config": "rlhf config show|validate [--config FILE|NAME] [key=value ...]",
    "configs": "rlhf configs ls | rlhf configs cp NAME DEST",
}
_OTHER_HELP = {
    "status": "Lineage, status and metrics of each stage of a run.\n",
    "compare": ("Finished runs side by side: one row per run and trained policy (PPO, DPO,\n"
                "best-of-N) from each run's eval/results.json, and each group's mean and spread\n"
                "over seeds; runs of one seed also head to head, per prompt, from their\n"
                "eval/samples.jsonl. Every RUN_DIR needs a complete eval stage.\n\n"
                "--out DIR     where compare.json, compare.md and compare.html go\n"
                "              (default: runs/compare)\n"
                "--group-by    estimator (default): one group per policy label, each PPO\n"
                "              advantage estimator apart; policy: PPO, DPO, best-of-N\n"),
    "config": ("show      print the resolved config (defaults <- --config <- key=value) as YAML\n"
               "validate  check it (types, values, user functions) and list every problem;\n"
               "          exit code 0 when valid, 2 otherwise. Data files are read by the stages.\n"),
    "configs": ("ls           the shipped configs, by the name --config accepts\n"
                "cp NAME DEST copy one to DEST (a file, or a folder to put it in) to edit it;\n"
                "             an existing file is never overwritten\n"),
}


def _usage(command: str) -> str:
    return _USAGE.get(command, f"rlhf {command} [--config FILE|NAME] [key=value ...]")


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"rlhf {command}", add_help=False, usage=_usage(command))
    p.add_argument("-h", "--help", action="store_true")
    if command in (*RUN_COMMANDS, "config"):
        p.add_argument("--config", "-c", default=None, help="YAML config file or shipped name")
    if command == "compare":
        p.add_argument("--out", default=None)
        p.add_argument("--group-by", default="estimator")
    p.add_argument("rest", nargs="*",
                   help="key=value overrides (or RUN_DIR for status and compare)")
    return p


def command_help(command: str) -> str:
    """``rlhf COMMAND --help``: what it does, then every key it reads."""
    if command in _OTHER_HELP:
        return f"usage: {_usage(command)}\n\n{_OTHER_HELP[command]}"
    sections = keydoc.sections(command)
    summary = _RUN_SUMMARY.get(command) or keydoc.section_summary(sections[0])
    return (f"usage: {_usage(command)}\n\n{summary}\n"
            "Set keys in the YAML file or as key=value; `rlhf config show` prints the resolved "
            "values.\n\n" + keydoc.describe_keys(sections))


def stage_class(name: str):
    """The ``Stage`` subclass that runs the stage command ``name``."""
    return import_callable(STAGE_CLASSES[name], "stage")


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


def compare_command(run_dirs: list[str], out: str | None, group_by: str) -> int:
    from stages import compare

    if not run_dirs or group_by not in compare.GROUP_BY:
        problem = ("no RUN_DIR given" if not run_dirs else
                   f"--group-by {group_by!r}: expected {' or '.join(compare.GROUP_BY)}")
        print(f"error: {problem}; usage: {_usage('compare')}", file=sys.stderr)
        return 2
    try:
        target = compare.run([Path(d) for d in run_dirs],
                             Path(out) if out else compare.OUT, group_by)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[compare] {len(run_dirs)} runs: {target / 'compare.md'}, {target / 'compare.html'}")
    return 0


def configs_command(rest: list[str]) -> int:
    if rest == ["ls"]:
        found = shipped.configs()
        if not found:
            print("error: no shipped configs found (is the package installed?)", file=sys.stderr)
            return 1
        width = max(len(n) for n in found) + 2
        for name, path in found.items():
            lines = textwrap.wrap(shipped.describe(path), max(40, 100 - width))
            print(f"{name:{width}s}{lines[0]}")
            for line in lines[1:]:
                print(" " * width + line)
        print(f"\n({shipped.root() / 'configs'}; use one with --config NAME, copy one with "
              "`rlhf configs cp NAME DEST`)")
        return 0
    if len(rest) == 3 and rest[0] == "cp":
        try:
            target = shipped.copy_config(rest[1], rest[2])
        except (FileNotFoundError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"copied {shipped.find_config(rest[1])} -> {target}")
        return 0
    print(f"error: usage: {_usage('configs')}", file=sys.stderr)
    return 2


def _importable_cwd() -> None:
    # "module:function" names resolve against the working directory, as under `python -m`
    # (a console script's path lacks it); config validation imports them.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def config_command(config: str | None, rest: list[str]) -> int:
    if not rest or rest[0] not in ("show", "validate"):
        print(f"error: usage: {_usage('config')}", file=sys.stderr)
        return 2
    action, overrides = rest[0], rest[1:]
    _importable_cwd()
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if action == "show":
        print(to_yaml(cfg), end="")
        return 0
    source = shipped.resolve_config(config) if config else "the defaults"
    extra = f" with {len(overrides)} override(s)" if overrides else ""
    print(f"valid: {source}{extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr, end="")
        return 2
    command = argv[0]
    if command in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)} "
              "(rlhf --help)", file=sys.stderr)
        return 2
    args = _parser(command).parse_intermixed_args(argv[1:])
    if args.help:
        print(command_help(command), end="")
        return 0
    if command == "status":
        if len(args.rest) != 1:
            print(f"error: usage: {_usage(command)}", file=sys.stderr)
            return 2
        return status(Path(args.rest[0]))
    if command == "compare":
        return compare_command(args.rest, args.out, args.group_by)
    if command == "configs":
        return configs_command(args.rest)
    if command == "config":
        return config_command(args.config, args.rest)
    _importable_cwd()
    try:
        cfg = load_config(args.config, args.rest)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if command == "seeds":
        from pipeline import seeds

        try:
            seeds.run(cfg, args.config, args.rest)
        except (PipelineError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if command == "scaling":
        from stages import scaling

        try:
            scaling.run(cfg)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (PipelineError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            again = ["rlhf", "scaling", *(["--config", args.config] if args.config else []),
                     *args.rest]
            print("interrupted: finished stages are kept and reused; continue with: "
                  f"{shlex.join(again)}", file=sys.stderr)
            return 130
        return 0
    stages = cfg.pipeline.stages if command == "pipeline" else (command,)
    main_process = os.environ.get("RANK", "0") == "0"
    current = None
    try:
        for name in stages:
            current = name
            done = read_manifest(cfg.run_dir / name) if name in STAGES else None
            stage_cfg = cfg
            if command == "pipeline" and cfg.run.resume:
                if done is not None and done.get("status") == "complete":
                    # Resuming a pipeline continues the stage that was killed, not the
                    # finished ones.
                    if main_process:
                        print(f"[{name}] already complete, skipped: {cfg.run_dir / name}")
                    continue
                stage_cfg, note = resume_plan(cfg, name)
                if note and main_process:
                    print(note)
            stage = stage_class(name)(stage_cfg)
            path = stage.run()
            if os.environ.get("RANK", "0") == "0":
                print(stage.done(path))
    except (PipelineError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if main_process:
            print(interrupted(command, args.config, args.rest, cfg, current),
                  file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

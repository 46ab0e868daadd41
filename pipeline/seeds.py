"""``rlhf seeds``: the chain after SFT (label -> rm -> ppo -> eval -> report, or whatever
``pipeline.stages`` lists) for several seeds, one table.

One run proves little in RLHF: the sampled trajectory, the annotators' noise and the reward
model all move with the seed (and with float rounding, hence with the thread count). This
runs the chain once per seed in ``run.seeds`` and writes what each seed ended at.

The SFT stage is trained once, in ``<root>/<name>/sft`` with the config's own ``run.seed``, and
shared: every seed's chain starts from the same policy, so the spread in the table is the
spread of everything after SFT. Seed ``s`` lives in ``<root>/<name>-seed<s>/``. Each stage runs
as its own process (``python -m pipeline.cli``), so ``run.seed_jobs`` chains can run side by
side and a stage that dies takes nothing else with it. Stages that already finished are
skipped (unless ``run.overwrite=true``), so running the command again continues where it
stopped.

Output: ``<root>/<name>/seeds.json`` (one object per seed) and ``seeds.md`` (the same table in
markdown, with the mean and spread).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.rundir import atomic_write_json, atomic_write_text, read_manifest

# Overrides that point every stage of a seed's chain at the shared SFT stage.
SFT_KEYS = ("label.policy", "rm.sft", "ppo.policy", "dpo.sft", "eval.sft")
TIMING = "seed_timing.json"


def seed_run_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def threads_per_job(cfg: Config) -> int:
    if cfg.run.threads > 0:
        return cfg.run.threads
    return max(1, (os.cpu_count() or 1) // cfg.run.seed_jobs)


def _complete(stage_dir: Path) -> bool:
    manifest = read_manifest(stage_dir)
    return manifest is not None and manifest.get("status") == "complete"


def _run_stage(stage: str, config_file: str | None, overrides: list[str], log: Path) -> float:
    """Run one stage in a child process; its output goes to ``log``. Returns seconds taken."""
    cmd = [sys.executable, "-m", "pipeline.cli", stage]
    if config_file:
        cmd += ["--config", config_file]
    cmd += overrides
    start = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise PipelineError(f"seeds: stage {stage} failed (exit code {code}); see {log}")
    return time.time() - start


def chain(cfg: Config) -> list[str]:
    """The stages each seed runs: ``pipeline.stages`` after the shared SFT."""
    return [s for s in cfg.pipeline.stages if s != "sft"]


def run_chain(cfg: Config, config_file: str | None, overrides: list[str], seed: int,
              sft_dir: Path, echo) -> dict[str, float]:
    """One seed's chain; returns seconds per stage (of this and earlier invocations)."""
    name = seed_run_name(cfg.run.name, seed)
    run_dir = Path(cfg.run.root) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    # The shared SFT stage appears in the seed's run folder too, so its report and
    # `rlhf status` show the whole lineage.
    link = run_dir / "sft"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(os.path.relpath(sft_dir.resolve(), run_dir.resolve()))
    timing_path = run_dir / TIMING
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    mine = [*overrides, f"run.name={name}", f"run.seed={seed}",
            f"run.threads={threads_per_job(cfg)}", *(f"{k}={sft_dir}" for k in SFT_KEYS)]
    log = Path(cfg.run.root) / cfg.run.name / "seeds" / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for stage in chain(cfg):
        done = (run_dir / "report.html").is_file() if stage == "report" else \
            _complete(run_dir / stage)
        if done and not cfg.run.overwrite:
            echo(f"[seeds] seed {seed}: {stage} already complete, skipped")
            continue
        echo(f"[seeds] seed {seed}: {stage} ...")
        timing[stage] = round(_run_stage(stage, config_file, mine, log), 1)
        atomic_write_json(timing_path, timing)
        echo(f"[seeds] seed {seed}: {stage} done in {timing[stage] / 60:.1f} min")
    return timing


def seed_row(cfg: Config, seed: int, timing: dict[str, float]) -> dict:
    """The figures one seed ended at, read from its stages' outputs."""
    run_dir = Path(cfg.run.root) / seed_run_name(cfg.run.name, seed)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    rm = (read_manifest(run_dir / "rm") or {}).get("metrics", {})
    label = (read_manifest(run_dir / "label") or {}).get("metrics", {})
    policies, wins = results["policies"], results["win_rates"]
    row: dict = {"seed": seed}
    if "ppo" in policies:
        win = wins["ppo_vs_sft"]
        row.update({"win_rate": win["mean"], "ci_low": win["ci95"][0],
                    "ci_high": win["ci95"][1]})
    row.update({
        "gold_sft": policies["sft"]["gold"]["mean"],
        "rm_gold_accuracy": rm.get("eval_accuracy_gold_after"),
        "rm_annotator_accuracy": rm.get("eval_accuracy_after"),
        "label_agreement_with_gold": label.get("agreement_with_gold"),
        "length_sft": policies["sft"]["length_mean"],
        "no_eos_sft": policies["sft"]["no_eos_frac"],
        "num_prompts": results["num_prompts"],
        "minutes": round(sum(timing.values()) / 60, 1),
    })
    if "ppo" in policies:
        row.update({"gold_ppo": policies["ppo"]["gold"]["mean"],
                    "kl": policies["ppo"]["kl"]["mean"],
                    "length_ppo": policies["ppo"]["length_mean"],
                    "no_eos_ppo": policies["ppo"]["no_eos_frac"]})
    if "bon" in policies:
        row.update({"gold_bon": policies["bon"]["gold"]["mean"],
                    "kl_bon": policies["bon"]["kl"]["mean"]})
        if "ppo_vs_bon" in wins:
            row["win_rate_ppo_vs_bon"] = wins["ppo_vs_bon"]["mean"]
    if "dpo" in policies:
        win = wins["dpo_vs_sft"]
        row.update({"win_rate_dpo": win["mean"], "dpo_ci_low": win["ci95"][0],
                    "dpo_ci_high": win["ci95"][1],
                    "gold_dpo": policies["dpo"]["gold"]["mean"],
                    "kl_dpo": policies["dpo"]["kl"]["mean"],
                    "length_dpo": policies["dpo"]["length_mean"],
                    "no_eos_dpo": policies["dpo"]["no_eos_frac"]})
        if "dpo_vs_ppo" in wins:
            row["win_rate_dpo_vs_ppo"] = wins["dpo_vs_ppo"]["mean"]
    # What each route costs after the shared label stage: reward model + PPO, or DPO.
    if "ppo" in timing:
        row["minutes_rm_ppo"] = round((timing.get("rm", 0) + timing["ppo"]) / 60, 1)
    if "dpo" in timing:
        row["minutes_dpo"] = round(timing["dpo"] / 60, 1)
    return row


COLUMNS = (("seed", "seed", "{}"), ("win_rate", "PPO vs SFT win rate", "{:.3f}"),
           ("ci", "95% CI", ""), ("win_rate_dpo", "DPO vs SFT win rate", "{:.3f}"),
           ("dpo_ci", "95% CI", ""), ("win_rate_dpo_vs_ppo", "DPO vs PPO win rate", "{:.3f}"),
           ("gold_sft", "gold SFT", "{:.4f}"),
           ("gold_bon", "gold best-of-N", "{:.4f}"), ("gold_ppo", "gold PPO", "{:.4f}"),
           ("gold_dpo", "gold DPO", "{:.4f}"),
           ("kl", "KL PPO-SFT (nats)", "{:.2f}"), ("kl_dpo", "KL DPO-SFT (nats)", "{:.2f}"),
           ("rm_gold_accuracy", "RM acc. vs gold", "{:.3f}"),
           ("minutes_rm_ppo", "rm + ppo minutes", "{:.1f}"),
           ("minutes_dpo", "dpo minutes", "{:.1f}"), ("minutes", "minutes", "{:.1f}"))
# The interval columns and the row keys they show.
INTERVALS = {"ci": ("ci_low", "ci_high"), "dpo_ci": ("dpo_ci_low", "dpo_ci_high")}
# Shown whatever the rows hold (the table the default run has always had); the others, DPO's
# and each route's minutes, where some seed evaluated a DPO policy and has that value.
ALWAYS = ("seed", "win_rate", "ci", "gold_sft", "gold_bon", "gold_ppo", "kl",
          "rm_gold_accuracy", "minutes")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    with_dpo = any("gold_dpo" in r for r in rows)
    columns = [col for col in COLUMNS if col[0] in ALWAYS or with_dpo and any(
        INTERVALS.get(col[0], (col[0],))[0] in r for r in rows)]

    def cell(row, key, fmt):
        if key in INTERVALS:
            low, high = INTERVALS[key]
            return f"[{row[low]:.3f}, {row[high]:.3f}]" if low in row else "—"
        value = row.get(key)
        return "—" if value is None else fmt.format(value)

    lines = [[cell(r, k, f) for k, _, f in columns] for r in rows]
    if len(rows) > 1:
        cells = ["mean ± sd"]
        for key, _, fmt in columns[1:]:
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if key not in INTERVALS and len(values) == len(rows):
                mean, spread = mean_sd(values)
                cells.append(f"{fmt.format(mean)} ± {fmt.format(spread)}")
            else:
                cells.append("")
        lines.append(cells)
    return markdown_table([title for _, title, _ in columns], lines)


def run(cfg: Config, config_file: str | None, overrides: list[str], echo=print) -> Path:
    """Shared SFT, then one chain per seed (``run.seed_jobs`` at a time), then the table."""
    base = Path(cfg.run.root) / cfg.run.name
    sft_dir = base / "sft"
    # The sweep's own keys (run.seeds[1]=5 too) stay out of the chains' command lines.
    own = [o for o in overrides
           if o.split("=", 1)[0].split("[")[0].strip() not in ("run.seeds", "run.seed_jobs")]
    if not _complete(sft_dir):
        echo(f"[seeds] sft (shared by every seed) -> {sft_dir} ...")
        base.mkdir(parents=True, exist_ok=True)
        _run_stage("sft", config_file, own, base / "sft.log")
    else:
        echo(f"[seeds] sft already complete, shared: {sft_dir}")
    with ThreadPoolExecutor(max_workers=cfg.run.seed_jobs) as pool:
        timings = list(pool.map(
            lambda s: run_chain(cfg, config_file, own, s, sft_dir, echo), cfg.run.seeds))
    rows = [seed_row(cfg, s, t) for s, t in zip(cfg.run.seeds, timings)]
    atomic_write_json(base / "seeds.json", rows)
    table = markdown(rows)
    atomic_write_text(base / "seeds.md", table)
    echo(table)
    return base

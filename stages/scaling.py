"""``rlhf scaling``: predict the run from small ones before training it, then check.

The GPT-4 report's predictable scaling, asked of an RLHF run. In order:

1. SFT compute: short SFT runs (``scaling.sft_fractions`` of the full run's optimizer steps,
   each a complete run with its own schedule) give held-out loss against steps; a fit of
   L(C) = a*C^b + c predicts the full run's, which is recorded; then the full SFT stage trains
   and its measured loss is recorded after the prediction.
2. Reward-model data: after the label stage, reward models train on nested subsets of the
   labelled training prompts (``scaling.rm_fractions``) and are scored on the held-out prompts
   of the full reward model: pairwise log loss and accuracy against the annotators' labels and
   against gold. Fits of loss (a*n^b + c) and accuracy (alpha + beta ln n) against the number
   of training comparisons predict the full reward model's figures, and the number of
   comparisons at which accuracy reaches ``scaling.target_accuracy``; recorded, then the full
   reward-model stage trains and is scored the same way.
3. Overoptimization (``scaling.overoptimization``): PPO with snapshots, then eval (on
   ``scaling.eval_prompts`` prompts, without the calibration probe); Gao et al.'s
   forms fitted to the gold gain over SFT against d = sqrt(KL) for the PPO points and for
   best-of-n (n = 1..eval.best_of_n, from the same samples), with the KL where gold is predicted
   to peak, and a holdout: a fit on the early PPO points predicts the later ones. These points
   all come from one eval stage, so this part is a holdout, not a prediction made before
   training; ``scaling.json`` says so.

The full-size stages are the run's own (``<run>/sft``, ``label``, ``rm``, ``ppo``, ``eval``, then
``report.html`` with a section on the fits), so the command also leaves a complete run; the small
runs live in ``<run>/scaling/<name>/``. Every stage is the stage module's own ``run()`` on a copy
of the config with a few keys overridden; the small runs of a part train ``scaling.jobs`` at a
time, each in its own process with its share of the threads. A stage that is already complete is reused (not
retrained; ``run.overwrite=true`` retrains it), so a killed command continues where it stopped;
a reused full-size stage is marked so, with its start and finish times beside the prediction's.

Output: ``<run>/scaling.json``, rewritten atomically after every record, so each prediction is
on disk before the stage it predicts starts; the records' order and times show it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import gc
import importlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, ConfigError, to_dict
from pipeline.data import RankedExample, column_map, load_demonstrations, load_ranked
from pipeline.errors import PipelineError
from pipeline.models import load_reward_model, load_tokenizer
from pipeline.processes import run_sharded
from pipeline.rundir import (
    Parent,
    atomic_write_json,
    atomic_write_text,
    check_same_tokenizer,
    git_sha,
    open_parent,
    read_manifest,
    stage_dir,
)
from pipeline.runtime import prepare_process
from pipeline.training import planned_steps
from stages import evaluate, fits, label, ppo, report, reward, sft
from stages.scoring import ScoreModel, score_sequences

SCHEMA = "rlhf-pipeline/scaling/v1"
SCALING_JSON = report.SCALING_JSON
# The small runs' folder under the run folder.
SUBRUNS = "scaling"
# Points of each fitted curve stored for the plots.
CURVE_POINTS = 60
# The comparisons-for-a-target search stops at this multiple of the full data.
TARGET_SEARCH = 1000.0
INTERVALS = ("delta method on the least-squares fit: the parameters' covariance is the "
             "residual variance times (J^T J)^-1, with a Student-t quantile on (points - "
             "parameters) degrees of freedom; 'low'/'high' bound one new measurement (the "
             "curve's uncertainty plus the residual scatter), 'curve_low'/'curve_high' the curve")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def problems(cfg: Config) -> list[str]:
    """What ``rlhf scaling`` cannot run with, every problem listed."""
    s = cfg.scaling
    out = []
    for key, fractions in (("scaling.sft_fractions", s.sft_fractions),
                           ("scaling.rm_fractions", s.rm_fractions)):
        bad = [f for f in fractions if not 0 < f < 1]
        if bad:
            out.append(f"{key}={fractions}: expected fractions in (0, 1), got {bad[0]}")
        elif len(set(fractions)) < 4:
            out.append(f"{key}={fractions}: expected at least 4 distinct fractions (a*x^b + c "
                       "has 3 parameters, and the uncertainty needs one more point)")
    for key in ("target_accuracy", "early_fraction", "level"):
        if not 0 < getattr(s, key) < 1:
            out.append(f"scaling.{key}={getattr(s, key)}: expected in (0, 1)")
    if s.ppo_points < 1:
        out.append(f"scaling.ppo_points={s.ppo_points}: expected >= 1")
    if cfg.rm.eval_size < 1:
        out.append(f"rm.eval_size={cfg.rm.eval_size}: every reward model is scored on the "
                   "held-out prompts; expected >= 1")
    if cfg.run.resume:
        out.append("run.resume=true: `rlhf scaling` continues by itself (finished stages are "
                   "reused); expected false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        out.append("rlhf scaling runs in one process (it runs each stage in turn); start it "
                   "without `accelerate launch`")
    return out


# ---------------------------------------------------------------------------------------------
# The record: scaling.json, rewritten atomically after every entry
# ---------------------------------------------------------------------------------------------


def plain(value):
    """JSON-safe: numpy numbers as Python ones, nan and inf as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# Fields that differ when the same record is made again by a later invocation.
VOLATILE = ("time", "unix", "reused")


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


class Ledger:
    """The records in the order they were made; the file on disk always holds all of them.

    Run again (a command that stopped, or one whose stages are all complete), a record equal
    to one of the previous file's, times and reuse aside, keeps that record's time: a
    prediction made before its stage trained stays dated before it.
    """

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.previous: list[dict] = []
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = {}
            if isinstance(old, dict) and old.get("schema") == header.get("schema"):
                self.previous = (old.get("records") or []) + (old.get("earlier_records") or [])
        # Kept in the file until the command finishes, so one that stops early loses none.
        self.doc = {**header, "records": [],
                    **({"earlier_records": self.previous} if self.previous else {})}

    def add(self, kind: str, fit_id: str, **fields) -> dict:
        record = plain({"kind": kind, "id": fit_id, "time": now(), "unix": time.time(),
                        **fields})
        same = next((r for r in self.previous if _stable(r) == _stable(record)), None)
        if same is not None:
            record.update(time=same["time"], unix=same["unix"])
        self.doc["records"].append(record)
        self.write()
        return record

    def set(self, key: str, value) -> None:
        self.doc[key] = plain(value)
        self.write()

    def finish(self) -> None:
        self.doc.pop("earlier_records", None)
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, self.doc)


# ---------------------------------------------------------------------------------------------
# Running stages
# ---------------------------------------------------------------------------------------------


def with_keys(cfg: Config, values: dict) -> Config:
    """A copy of ``cfg`` with dotted keys set (``{"sft.max_steps": 4}``)."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        *path, name = key.split(".")
        node = out
        for part in path:
            node = getattr(node, part)
        if not hasattr(node, name):
            raise KeyError(key)
        setattr(node, name, value)
    return out


def sub_run(cfg: Config, name: str, values: dict) -> Config:
    """The config of a small run ``<run>/scaling/<name>``: nothing of it goes to the hub."""
    return with_keys(cfg, {"run.root": str(cfg.run_dir / SUBRUNS), "run.name": name,
                           "run.push_to_hub": False, **values})


def _complete(folder: Path, stage_cfg: Config) -> bool:
    manifest = read_manifest(folder) if folder.is_dir() else None
    return bool(manifest and manifest.get("status") == "complete" and not stage_cfg.run.overwrite)


def _small_run(module_name: str, stage_cfg: Config, log: str, stage: str, then=None):
    """One small run in a child process, its output in ``log``; returns ``then(stage
    folder)`` (None without it), computed there too."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    importlib.import_module(module_name).run(stage_cfg)
    return then(stage_cfg.run_dir / stage) if then else None


def job_threads(cfg: Config, jobs: int) -> int:
    """Threads of each of ``jobs`` small runs trained side by side: the run's threads (or the
    machine's cores) shared among them, at least one."""
    total = cfg.run.threads or os.cpu_count() or 1
    return max(1, total // jobs)


class Stages:
    """Runs stage modules, reusing complete ones; keeps the seconds each part took."""

    def __init__(self, echo):
        self.echo = echo
        self.seconds: dict[str, float] = {}

    def _took(self, part: str, start: float) -> float:
        taken = time.time() - start
        self.seconds[part] = self.seconds.get(part, 0.0) + taken
        return taken

    def run(self, module, stage_cfg: Config, stage: str, part: str,
            processes: int = 1) -> tuple[Path, bool]:
        """(stage folder, whether it was reused). ``processes`` > 1: the stage sharded across
        that many CPU processes of one gloo group, each with its share of the threads."""
        folder = stage_cfg.run_dir / stage
        if _complete(folder, stage_cfg):
            self.echo(f"[scaling] {folder} already complete: reused")
            return folder, True
        self.echo(f"[scaling] {stage} -> {folder}"
                  + (f" in {processes} processes" if processes > 1 else "") + " ...")
        start = time.time()
        if processes > 1:
            run_sharded(module.__name__,
                        with_keys(stage_cfg, {"run.threads": job_threads(stage_cfg, processes)}),
                        processes)
        else:
            module.run(stage_cfg)
        gc.collect()
        self.echo(f"[scaling] {stage} done in {self._took(part, start) / 60:.1f} min")
        return folder, False

    def run_side_by_side(self, module, configs: list[Config], stage: str, part: str,
                         jobs: int, then=None) -> list[tuple[Path, bool, object]]:
        """The small runs of one part, ``jobs`` at a time, each in its own process (its output
        in ``<small run>/<stage>.log``); (stage folder, reused, ``then(stage folder)``) in the
        order given, ``then`` (picklable) run in the run's own process, so that measuring a
        small run keeps both cores busy too. The largest run is started first (the configs
        are given smallest first), which keeps the processes busy until the end. One job runs
        them here, in turn."""
        def measured(folder: Path, reused: bool) -> tuple[Path, bool, object]:
            return folder, reused, then(folder) if then else None

        if jobs <= 1:
            return [measured(*self.run(module, c, stage, part)) for c in configs]
        out: list[tuple[Path, bool, object] | None] = [None] * len(configs)
        todo = []
        for i, c in enumerate(configs):
            if _complete(c.run_dir / stage, c):
                self.echo(f"[scaling] {c.run_dir / stage} already complete: reused")
                out[i] = measured(c.run_dir / stage, True)
            else:
                todo.append(i)
        if todo:
            workers = min(jobs, len(todo))
            self.echo(f"[scaling] {len(todo)} {stage} runs, {workers} at a time: "
                      + ", ".join(str(configs[i].run_dir / stage) for i in todo))
            start = time.time()
            pool = ProcessPoolExecutor(max_workers=workers,
                                       mp_context=multiprocessing.get_context("spawn"))
            try:
                futures = {}
                for i in reversed(todo):
                    c = configs[i]
                    c.run_dir.mkdir(parents=True, exist_ok=True)
                    log = c.run_dir / f"{stage}.log"
                    futures[pool.submit(_small_run, module.__name__, c, str(log), stage,
                                        then)] = (i, log)
                for future in as_completed(futures):
                    i, log = futures[future]
                    try:
                        result = future.result()
                    except Exception as exc:
                        raise PipelineError(f"scaling: the small run {configs[i].run_dir / stage}"
                                            f" failed ({exc}); its output: {log}") from exc
                    out[i] = (configs[i].run_dir / stage, False, result)
                    self.echo(f"[scaling] {configs[i].run_dir / stage} done")
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            self.echo(f"[scaling] {stage} runs done in {self._took(part, start) / 60:.1f} min")
        return out


def stage_times(folder: Path) -> dict:
    """When a stage started (its config.yaml is written at the start) and finished."""
    started = (folder / "config.yaml").stat().st_mtime
    manifest = read_manifest(folder) or {}
    return {"stage_started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(
                timespec="microseconds"),
            "stage_started_unix": started, "stage_finished": manifest.get("created")}


# ---------------------------------------------------------------------------------------------
# Fits and their records
# ---------------------------------------------------------------------------------------------


def curve(fit: fits.Fit, low: float, high: float, log_x: bool = True) -> list[dict]:
    xs = np.geomspace(low, high, CURVE_POINTS) if log_x else np.linspace(low, high, CURVE_POINTS)
    value, lo, hi, c_lo, c_hi = fit.band(xs)
    return [{"x": x, "y": v, "low": a, "high": b, "curve_low": c, "curve_high": d}
            for x, v, a, b, c, d in zip(xs, value, lo, hi, c_lo, c_hi)]


def predict(kind: str, xs, ys, target_x: float, level: float) -> dict:
    """{fit, curve, predicted} of one form ("power" or "log") at ``target_x``, or {error}."""
    try:
        fit = (fits.power_law if kind == "power" else fits.log_linear)(xs, ys, level=level)
        span = (min(xs) / 1.5, target_x * 1.5)
        return {"fit": fit.as_dict(), "curve": curve(fit, *span),
                "predicted": fit.predict(target_x).as_dict(), "_fit": fit}
    except fits.FitError as exc:
        return {"error": str(exc)}


def inside(value, low, high) -> bool | None:
    if value is None or low is None or high is None:
        return None
    return bool(low <= value <= high)


def measurement(ledger: Ledger, fit_id: str, prediction: dict, value, folder: Path,
                reused: bool, x, interval=(None, None), **extra) -> dict:
    """Record a full-size figure beside the prediction made before its stage ran."""
    times = stage_times(folder)
    predicted = prediction.get("predicted") or {}
    return ledger.add(
        "measurement", fit_id, x=x, value=value, low=interval[0], high=interval[1],
        stage=str(folder), reused=reused, **times,
        prediction_first=prediction["unix"] < times["stage_started_unix"],
        within_interval=inside(value, predicted.get("low"), predicted.get("high")), **extra)


def comparisons(examples: list[RankedExample]) -> int:
    """Strictly ordered response pairs: what the reward model trains on."""
    return sum(1 for ex in examples for i, a in enumerate(ex.ranks) for b in ex.ranks[i + 1:]
               if a != b)


def ranked_row(ex: RankedExample) -> dict:
    row = {"prompt": list(ex.messages) if ex.messages else ex.prompt,
           "responses": list(ex.responses), "ranks": list(ex.ranks)}
    if ex.reference is not None:
        row["reference"] = ex.reference
    if ex.gold_scores is not None:
        row["gold_scores"] = list(ex.gold_scores)
    return row


@torch.no_grad()
def heldout_rewards(model_dir: Path, groups: list[reward.Group], tok, cfg: Config,
                    device: torch.device) -> torch.Tensor:
    """(N,) a reward model's raw reward of every held-out response, flattened by group."""
    scorer = ScoreModel(load_reward_model(model_dir, cfg.model, tok)).to(device)
    return score_sequences(scorer, [s for g in groups for s in g.sequences], tok.pad_token_id,
                           cfg.rm.batch_size * 4, device, reward.prompt_groups(groups))


def pair_columns(rewards: torch.Tensor, groups: list[reward.Group]) -> dict[str, list[float]]:
    """Per prompt: pairs, correctly ordered pairs and log loss against the annotators' ranks,
    and pairs and correct ones against gold (none where the data has no gold). A tied reward
    counts as a wrong prediction, as in the reward stage's own held-out accuracy."""
    columns = {k: [] for k in ("pairs", "correct", "loss", "gold_pairs", "gold_correct")}
    offset = 0
    for g in groups:
        mine = rewards[offset: offset + len(g.sequences)]
        offset += len(g.sequences)
        gaps = torch.tensor(reward.pair_gaps(mine, [g.ranks]), dtype=torch.float64)
        columns["pairs"].append(len(gaps))
        columns["correct"].append(float((gaps > 0).sum()))
        columns["loss"].append(float(torch.nn.functional.softplus(-gaps).sum()))
        gold = torch.tensor(reward.pair_gaps(mine, [g.gold]) if g.gold else [],
                            dtype=torch.float64)
        columns["gold_pairs"].append(len(gold))
        columns["gold_correct"].append(float((gold > 0).sum()))
    return columns


def heldout_figures(rm_dir: Path, groups: list[reward.Group], tok, cfg: Config,
                    device: torch.device) -> dict:
    """A reward model on the held-out prompts: pairwise log loss and accuracy against the
    annotators' ranks and accuracy against gold (``pair_columns``), each with a bootstrap
    interval over prompts (``eval.bootstrap`` resamples)."""
    columns = pair_columns(heldout_rewards(rm_dir / "model", groups, tok, cfg, device), groups)
    resamples, seed, level = cfg.eval.bootstrap, cfg.run.seed, cfg.scaling.level

    def figure(num: str, den: str) -> dict | None:
        total = sum(columns[den])
        if not total:
            return None
        low, high = fits.ratio_interval(columns[num], columns[den], resamples, seed, level)
        return {"value": sum(columns[num]) / total, "low": low, "high": high}

    return {"loss": figure("loss", "pairs"), "accuracy": figure("correct", "pairs"),
            "accuracy_gold": figure("gold_correct", "gold_pairs"),
            "pairs": sum(columns["pairs"]), "gold_pairs": sum(columns["gold_pairs"]),
            "heldout_prompts": len(groups)}


# ---------------------------------------------------------------------------------------------
# Overoptimization (from an eval stage's results.json)
# ---------------------------------------------------------------------------------------------


def _gain_points(rows: list[dict], key: str, baseline: float) -> tuple[list[dict], list[dict]]:
    kept, dropped = [], []
    for r in rows:
        if r["kl"] is None or not r["kl"] > 0:
            dropped.append({key: r[key], "kl": r["kl"], "reason": "KL <= 0: d = sqrt(KL) is "
                            "not > 0 (the estimate's noise near the start)"})
            continue
        kept.append({key: r[key], "kl": r["kl"], "d": math.sqrt(r["kl"]),
                     "gold": r["gold"], "gain": r["gold"] - baseline})
    return kept, dropped


def _fit_gain(form: str, points: list[dict], level: float) -> fits.Fit:
    fitter = fits.rl_overoptimization if form == "rl" else fits.bon_overoptimization
    return fitter([p["d"] for p in points], [p["gain"] for p in points], level=level)


def overoptimization(results: dict, early_fraction: float, level: float) -> list[dict]:
    """Records (``kind: holdout``) of Gao et al.'s fits to an eval stage's results: PPO's
    gold gain over SFT against d = sqrt(KL to SFT) for its snapshots and final policy, and
    best-of-n's for n = 2..N. Each: a fit on all points with the KL of the predicted peak, and
    a fit on the early points (PPO: updates <= early_fraction x the last; best-of-n: n <=
    early_fraction x N) with its predictions at the later ones. A fit the points cannot support
    is an ``error`` line, not a failure."""
    out = []
    sources = []
    points = results.get("overoptimization") or []
    origin = next((p for p in points if p.get("method") == "sft"), None)
    ppo_rows = [p for p in points if p.get("method") == "ppo"]
    if origin is not None and ppo_rows:
        last = max(p["update"] for p in ppo_rows)
        sources.append(("overoptimization.ppo", "rl", "update", origin["gold"], ppo_rows,
                        early_fraction * last, "PPO policies: snapshots and the final one"))
    bon = results.get("best_of_n_curve") or []
    if len(bon) > 1:
        sources.append(("overoptimization.bon", "bon", "n", bon[0]["gold"], bon[1:],
                        early_fraction * bon[-1]["n"],
                        "best-of-n for n = 2..N from the same SFT samples (n = 1 is the "
                        "baseline)"))
    for fit_id, form, key, baseline, rows, cutoff, what in sources:
        kept, dropped = _gain_points(rows, key, baseline)
        record = {"kind": "holdout", "id": fit_id, "points_are": what, "key": key,
                  "x_name": "sqrt(KL to SFT), d", "y_name": "gold gain over the start",
                  "baseline_gold": baseline, "early_cutoff": cutoff,
                  "note": ("early and later points come from one eval stage: the early fit "
                           "reads only the early ones, but nothing was predicted before "
                           "the later ones were measured"),
                  "points": [{**p, "early": p[key] <= cutoff} for p in kept],
                  "dropped": dropped}
        try:
            fit = _fit_gain(form, kept, level)
            d_max = max(p["d"] for p in kept)
            peak = (fits.rl_peak if form == "rl" else fits.bon_peak)(fit)
            reach = d_max * 1.5
            if peak.get("kl") and math.sqrt(peak["kl"]) < d_max * 4:
                reach = max(reach, math.sqrt(peak["kl"]) * 1.2)
            record.update(form=fit.form, fit=fit.as_dict(), peak=peak,
                          curve=curve(fit, d_max / 200, reach, log_x=False))
        except fits.FitError as exc:
            record["error"] = str(exc)
        early = [p for p in kept if p[key] <= cutoff]
        later = [p for p in kept if p[key] > cutoff]
        try:
            if not later:
                raise fits.FitError(f"no point after the early cutoff ({key} <= {cutoff:g})")
            early_fit = _fit_gain(form, early, level)
            record["early_fit"] = early_fit.as_dict()
            record["early_curve"] = curve(early_fit, max(p["d"] for p in kept) / 200,
                                          max(p["d"] for p in kept) * 1.1, log_x=False)
            record["predictions"] = []
            for p in later:
                pred = early_fit.predict(p["d"]).as_dict()
                record["predictions"].append({
                    key: p[key], "kl": p["kl"], **pred, "measured": p["gain"],
                    "within_interval": inside(p["gain"], pred["low"], pred["high"])})
        except fits.FitError as exc:
            record["early_error"] = str(exc)
        out.append(plain(record))
    return out


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def summary(records: list[dict]) -> list[dict]:
    """One row per predicted figure: predicted (interval) against measured (interval)."""
    predictions = {r["id"]: r for r in records if r["kind"] == "prediction"}
    rows = []
    for r in records:
        if r["kind"] == "measurement":
            p = predictions.get(r["id"], {})
            pred = p.get("predicted") or {}
            rows.append({"id": r["id"], "x": r["x"], "predicted": pred.get("value"),
                         "low": pred.get("low"), "high": pred.get("high"),
                         "measured": r["value"], "measured_low": r.get("low"),
                         "measured_high": r.get("high"),
                         "within_interval": r.get("within_interval"),
                         "prediction_first": r.get("prediction_first"),
                         "error": p.get("error"), "note": p.get("note")})
        elif r["kind"] == "holdout":
            for q in r.get("predictions") or []:
                rows.append({"id": f"{r['id']}@{r['key']}={q[r['key']]}", "x": q["kl"],
                             "predicted": q["value"], "low": q["low"], "high": q["high"],
                             "measured": q["measured"], "measured_low": None,
                             "measured_high": None, "within_interval": q["within_interval"],
                             "prediction_first": False, "error": None})
            if r.get("early_error"):
                rows.append({"id": f"{r['id']} (early fit)", "error": r["early_error"]})
    return rows


def _say(echo, fit_id: str, what: dict) -> None:
    if "error" in what:
        echo(f"[scaling] {fit_id}: no prediction ({what['error']})")
        return
    p = what["predicted"]
    echo(f"[scaling] {fit_id}: predicted {p['value']:.4g} [{p['low']:.4g}, "
         f"{p['high']:.4g}] at x = {p['x']:.4g}")


def _said(echo, record: dict) -> None:
    verdict = {True: "inside the interval", False: "OUTSIDE the interval",
               None: "no interval to compare"}[record["within_interval"]]
    echo(f"[scaling] {record['id']}: measured {record['value']:.4g} ({verdict})")


def sft_part(cfg: Config, ledger: Ledger, stages: Stages, echo) -> None:
    c = cfg.sft
    demos = load_demonstrations(cfg.data.sft, columns=column_map(cfg.data.columns, "sft"))
    _, train_rows = sft.split_rows(demos, c, cfg.run.seed)
    full = planned_steps(math.ceil(len(train_rows) / c.batch_size), 1, c.grad_accum_steps,
                         c.epochs, c.max_steps)
    steps = sorted({max(1, round(f * full)) for f in cfg.scaling.sft_fractions} - {full})
    threads = job_threads(cfg, cfg.scaling.jobs)
    subs = [sub_run(cfg, f"sft-{k}", {"sft.max_steps": k, "sft.num_samples": 0,
                                      "sft.save_every": 0, "sft.eval_every": 0,
                                      "sft.eval_before": False, "run.threads": threads})
            for k in steps]
    points = []
    for folder, reused, _ in stages.run_side_by_side(sft, subs, "sft", "sft_short_runs",
                                                     cfg.scaling.jobs):
        m = read_manifest(folder)["metrics"]
        points.append({"x": m["steps"], "y": m["eval_loss_after"], "run": str(folder),
                       "reused": reused})
    what = predict("power", [p["x"] for p in points], [p["y"] for p in points], full,
                   cfg.scaling.level)
    prediction = ledger.add("prediction", "sft.eval_loss", x_name="optimizer steps",
                            y_name="held-out loss (nats / token)", points=points,
                            **{k: v for k, v in what.items() if k != "_fit"})
    _say(echo, "sft.eval_loss", what)
    folder, reused = stages.run(sft, cfg, "sft", "sft_full")
    m = read_manifest(folder)["metrics"]
    _said(echo, measurement(ledger, "sft.eval_loss", prediction, m["eval_loss_after"], folder,
                            reused, m["steps"], planned_x=full))


RM_FITS = (("rm.heldout_loss", "loss", "power",
            "held-out pairwise log loss vs annotators (nats / pair)"),
           ("rm.accuracy", "accuracy", "log", "held-out pairwise accuracy vs annotators"),
           ("rm.accuracy_gold", "accuracy_gold", "log", "held-out pairwise accuracy vs gold"))


def ranked_inputs(cfg: Config) -> tuple[Parent, str, dict | None]:
    """(SFT parent, ranked data source, its column renames) the reward stage will train on,
    found before any subset is trained (the reward stage opens them again itself)."""
    c = cfg.rm
    sft_parent = open_parent(stage_dir(cfg, "sft", c.sft), "sft", "rm.sft")
    source = c.data or cfg.data.ranked
    if source:
        return sft_parent, source, column_map(cfg.data.columns, "ranked")
    role = "rm.data (label stage)"
    labelled = open_parent(stage_dir(cfg, "label", None), "label", role)
    check_same_tokenizer(sft_parent.manifest.get("tokenizer_sha256") or "", labelled, role)
    return sft_parent, str(labelled.path / "data.jsonl"), None


def rm_part(cfg: Config, ledger: Ledger, stages: Stages, echo, device) -> None:
    if not (cfg.rm.data or cfg.data.ranked):
        stages.run(label, cfg, "label", "label", sampling_processes(cfg, device))
    sft_parent, source, columns = ranked_inputs(cfg)
    examples = load_ranked(source, columns=columns)
    if cfg.rm.eval_size >= len(examples):
        raise PipelineError(f"rm.eval_size={cfg.rm.eval_size} leaves no training prompts: "
                            f"{source} has {len(examples)} ranked prompts")
    held, train = reward.heldout_split(examples, cfg.rm.eval_size, cfg.run.seed)
    tok = load_tokenizer(str(sft_parent.model_dir), cfg.model)
    held_groups, _ = reward.encode_groups(tok, held, cfg.data.max_prompt_tokens,
                                          cfg.rm.max_seq_len)
    # The subsets are in the canonical ranked form: renames of data.ranked do not apply.
    own_columns = {k: v for k, v in cfg.data.columns.items() if k != "ranked"}
    sizes = sorted({max(1, round(f * len(train))) for f in cfg.scaling.rm_fractions}
                   - {len(train)})
    threads = job_threads(cfg, cfg.scaling.jobs)
    subs = []
    for n in sizes:
        data = cfg.run_dir / SUBRUNS / f"rm-{n}" / "data.jsonl"
        atomic_write_text(data, "".join(json.dumps(ranked_row(ex), ensure_ascii=False) + "\n"
                                        for ex in train[:n]))
        values = {"rm.data": str(data), "rm.sft": str(sft_parent.path), "rm.eval_size": 0,
                  "rm.norm_samples": 0, "rm.save_every": 0, "rm.eval_every": 0,
                  "data.columns": own_columns, "run.threads": threads}
        if cfg.rm.max_steps > 0:
            # A step budget: the same passes over the smaller data.
            values["rm.max_steps"] = max(1, round(cfg.rm.max_steps * n / len(train)))
        subs.append(sub_run(cfg, f"rm-{n}", values))
    score = functools.partial(heldout_figures, groups=held_groups, tok=tok, cfg=cfg,
                              device=device)
    points = []
    for n, (folder, reused, figures) in zip(sizes, stages.run_side_by_side(
            reward, subs, "rm", "rm_subsets", cfg.scaling.jobs, then=score)):
        points.append({"x": comparisons(train[:n]), "prompts": n, "run": str(folder),
                       "reused": reused, **figures})
    full_x = comparisons(train)
    predictions = {}
    for fit_id, key, kind, y_name in RM_FITS:
        usable = [p for p in points if p[key] is not None]
        if not usable and key == "accuracy_gold":
            continue  # rankings without gold scores (data.ranked from people)
        what = predict(kind, [p["x"] for p in usable], [p[key]["value"] for p in usable],
                       full_x, cfg.scaling.level)
        extra = {}
        if key != "loss" and "_fit" in what:
            extra["target"] = fits.x_for_target(what["_fit"], cfg.scaling.target_accuracy,
                                                x_max=TARGET_SEARCH * full_x)
            if what["predicted"]["value"] > 1:
                extra["note"] = ("above 1: the log-linear form has no ceiling, and the fit "
                                 "extrapolates past what an accuracy can be")
        predictions[fit_id] = ledger.add(
            "prediction", fit_id, x_name="training comparisons", y_name=y_name,
            points=[{"x": p["x"], "y": p[key]["value"], "low": p[key]["low"],
                     "high": p[key]["high"], "prompts": p["prompts"], "run": p["run"],
                     "reused": p["reused"]} for p in usable],
            **{k: v for k, v in what.items() if k != "_fit"}, **extra)
        _say(echo, fit_id, what)
        if "target" in extra:
            t = extra["target"]
            echo(f"[scaling] {fit_id}: {t['target']:g} " + (
                f"predicted at {t['x']:.0f} comparisons" if t["x"] else
                f"not reached within {t['x_max']:.0f} comparisons"))
    folder, reused = stages.run(reward, cfg, "rm", "rm_full")
    figures = heldout_figures(folder, held_groups, tok, cfg, device)
    stage_metrics = read_manifest(folder)["metrics"]
    for fit_id, key, _, _ in RM_FITS:
        if fit_id not in predictions or figures[key] is None:
            continue
        f = figures[key]
        _said(echo, measurement(
            ledger, fit_id, predictions[fit_id], f["value"], folder, reused, full_x,
            (f["low"], f["high"]), prompts=len(train),
            stage_reported={"accuracy": stage_metrics.get("eval_accuracy_after"),
                            "accuracy_gold": stage_metrics.get("eval_accuracy_gold_after")
                            }.get(key)))


def sampling_processes(cfg: Config, device: torch.device) -> int:
    """Processes the sampling stages (label, eval) are sharded across: ``scaling.jobs`` on a
    CPU, one on a GPU (whose processes would share the one device this command uses)."""
    return cfg.scaling.jobs if device.type == "cpu" else 1


def ppo_snapshots(cfg: Config) -> Config:
    """The config PPO runs with: snapshots at least ``scaling.ppo_points`` apart in all."""
    every = max(1, cfg.ppo.num_updates // cfg.scaling.ppo_points)
    if 0 < cfg.ppo.snapshot_every <= every:
        return cfg
    return with_keys(cfg, {"ppo.snapshot_every": every})


def lean_eval(cfg: Config, processes: int = 1) -> Config:
    """The config eval runs with: ``scaling.eval_prompts`` prompts, no calibration probe and
    no base model (the fits start at SFT), each of ``processes`` sampling its share of the
    prompts in one call where eval.batch_size is smaller (decoding is cheaper per token in
    wider batches)."""
    if cfg.scaling.eval_prompts is None:
        return cfg
    limit = cfg.scaling.eval_prompts
    if cfg.eval.num_prompts is not None:
        limit = min(limit, cfg.eval.num_prompts)
    return with_keys(cfg, {"eval.num_prompts": limit, "eval.calibration_questions": 0,
                           "eval.base": False,
                           "eval.batch_size": max(cfg.eval.batch_size,
                                                  math.ceil(limit / processes))})


def run(cfg: Config, echo=print) -> Path:
    """Every part in order; returns the path of scaling.json."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)
    cpu = prepare_process(cfg)
    device = torch.device("cpu" if cpu else "cuda")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ledger = Ledger(run_dir / SCALING_JSON, {
        "schema": SCHEMA, "run": cfg.run.name, "created": now(), "git_sha": git_sha(),
        "scaling": to_dict(cfg.scaling), "intervals": INTERVALS})
    stages = Stages(echo)
    sft_part(cfg, ledger, stages, echo)
    rm_part(cfg, ledger, stages, echo, device)
    if cfg.scaling.overoptimization:
        stages.run(ppo, ppo_snapshots(cfg), "ppo", "ppo")
        processes = sampling_processes(cfg, device)
        folder, _ = stages.run(evaluate, lean_eval(cfg, processes), "eval", "eval", processes)
        results = json.loads((folder / "results.json").read_text())
        for record in overoptimization(results, cfg.scaling.early_fraction, cfg.scaling.level):
            ledger.add(record["kind"], record["id"],
                       **{k: v for k, v in record.items() if k not in ("kind", "id")})
            for what in ("error", "early_error"):
                if record.get(what):
                    echo(f"[scaling] {record['id']}: {what.replace('_', ' ')}: {record[what]}")
            peak = record.get("peak") or {}
            if peak.get("kl"):
                echo(f"[scaling] {record['id']}: gold predicted to peak at KL {peak['kl']:.3g} "
                     f"[{peak['low']:.3g}, {peak['high']:.3g}]")
            elif peak.get("reason"):
                echo(f"[scaling] {record['id']}: no peak ({peak['reason']})")
            held = record.get("predictions") or []
            if held:
                hits = sum(bool(q["within_interval"]) for q in held)
                echo(f"[scaling] {record['id']}: the early fit holds {hits} of the "
                     f"{len(held)} later points within its intervals")
    ledger.set("summary", summary(ledger.doc["records"]))
    # This invocation's: a reused stage took none of it.
    ledger.set("seconds", {**{k: round(v, 1) for k, v in stages.seconds.items()},
                           "total": round(time.time() - started, 1)})
    ledger.finish()
    report.run(cfg)
    echo(f"[scaling] written: {ledger.path}; report: {run_dir / report.REPORT}")
    return ledger.path

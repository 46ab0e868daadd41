"""The run report: one self-contained HTML file, ``<run_dir>/report.html``.

Plots are inline base64 PNGs drawn with matplotlib's Agg backend and the CSS is inline, so the
file opens from disk with no network, no external assets and no JavaScript. Every section works
with whatever stages exist; a missing stage's section says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.rundir import STAGES, atomic_write_text, read_manifest  # noqa: E402

REPORT = "report.html"
# Sample rows shown in the report.
NUM_SAMPLES = 12

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-family: monospace; }
img.plot { max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }
p.missing { color: #a33; font-style: italic; }
.small { font-size: 0.85em; color: #555; }
"""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def read_metrics(path: Path) -> list[dict]:
    """Rows of a stage's metrics.jsonl ([] when it has none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def figure_img(name: str, draw: Callable, title: str, size=(7.0, 4.0)) -> str:
    """Draw with ``draw(fig)`` and return an <img> with the PNG inline."""
    fig = plt.figure(figsize=size, dpi=100)
    try:
        draw(fig)
        fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="plot" data-plot="{esc(name)}" alt="{esc(title)}" '
            f'src="data:image/png;base64,{data}" '
            "onerror=\"document.body.setAttribute('data-broken','1')\">")


def table(headers: list[str], rows: list[list], numeric: bool = True) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{fmt(v)}</td>' if numeric and isinstance(v, (int, float))
            and not isinstance(v, bool) else f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def reliability(ax, bins: list[dict], label: str) -> None:
    """Reliability diagram: accuracy against mean confidence of each non-empty bin."""
    used = [b for b in bins if b.get("count")]
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o-", label=label)


def reliability_axes(ax) -> None:
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)


def curves(rows: list[dict], keys: list[str], xlabel: str):
    """A draw function: one subplot per key that has data."""
    present = [k for k in keys if series(rows, k)[0]]

    def draw(fig):
        n = len(present)
        cols = 2 if n > 1 else 1
        nrows = (n + cols - 1) // cols
        for i, key in enumerate(present):
            ax = fig.add_subplot(nrows, cols, i + 1)
            ax.plot(*series(rows, key), marker=".")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel(xlabel)
    return present, draw


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def lineage(run_dir: Path, manifests: dict[str, dict]) -> str:
    if not manifests:
        return missing(f"No finished stages in {run_dir}.")
    rows = []
    for stage, m in manifests.items():
        metrics = m.get("metrics", {})
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in list(metrics.items())[:10]
                          if isinstance(v, (int, float, str)) and not isinstance(v, bool))
        parents = ", ".join(f"{k}: {Path(v['path']).name}" for k, v in m.get("parents", {}).items())
        rows.append([stage, m.get("status"), m.get("created"), str(m.get("git_sha"))[:12],
                     parents, shown])
    return table(["stage", "status", "created", "git sha", "parents", "key metrics"], rows,
                 numeric=False)


def sft_section(run_dir: Path, manifest: dict | None) -> str:
    if manifest is None:
        return missing("No SFT stage in this run.")
    rows = read_metrics(run_dir / "sft" / "metrics.jsonl")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for key in ("train/loss", "eval/loss"):
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if key == "eval/loss" else ".", label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        ax.legend()

    m = manifest.get("metrics", {})
    return (figure_img("sft_loss", draw, "SFT loss")
            + table(["eval loss before", "eval loss after", "steps"],
                    [[m.get("eval_loss_before"), m.get("eval_loss_after"), m.get("steps")]]))


def rm_section(manifest: dict | None) -> str:
    if manifest is None:
        return missing("No reward-model stage in this run.")
    m = manifest.get("metrics", {})
    bins = manifest.get("extras", {}).get("calibration") or []
    labels = [k for k in ("eval_accuracy", "eval_accuracy_gold", "eval_ece")
              if f"{k}_before" in m or f"{k}_after" in m]

    def draw(fig):
        ax = fig.add_subplot(1, 2 if bins else 1, 1)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [m.get(f"{k}_before") or 0 for k in labels], 0.4,
               label="before")
        ax.bar([i + 0.2 for i in x], [m.get(f"{k}_after") or 0 for k in labels], 0.4,
               label="after")
        ax.set_xticks(list(x), [k.replace("eval_", "") for k in labels], fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("held-out pairs", fontsize=9)
        if bins:
            ax2 = fig.add_subplot(1, 2, 2)
            reliability(ax2, bins, "reward model (after)")
            reliability_axes(ax2)
            ax2.set_title("calibration of pairwise preference", fontsize=9)

    rows = [[k.replace("eval_", ""), m.get(f"{k}_before"), m.get(f"{k}_after")] for k in labels]
    note = "" if bins else missing("The reward model's manifest has no calibration bins.")
    return (figure_img("rm_accuracy", draw, "Reward model: accuracy and calibration",
                       size=(9.0, 4.0))
            + table(["metric", "before", "after"], rows) + note)


def ppo_section(run_dir: Path, manifest: dict | None) -> str:
    if manifest is None:
        return missing("No PPO stage in this run.")
    rows = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    present, draw = curves(rows, ["objective/scores", "objective/kl", "objective/gold",
                                  "response/length"], "update")
    if not present:
        return missing("The PPO stage logged no curves.")
    return figure_img("ppo_curves", draw, "PPO training curves", size=(9.0, 6.0))


def overoptimization_section(results: dict) -> str:
    points = results.get("overoptimization") or []
    if not points:
        return missing("No PPO or DPO policy was evaluated, so there is no overoptimization "
                       "view.")

    # One curve per method (PPO, DPO), each starting from the shared SFT point; results
    # written before DPO existed have PPO points only and no "method".
    origin = [p for p in points if p.get("method", p.get("policy")) == "sft"]
    methods = list(dict.fromkeys(p.get("method", "ppo") for p in points if p not in origin))
    curves = {m: origin + [p for p in points if p not in origin and p.get("method", "ppo") == m]
              for m in methods}
    colors = {"ppo": ("tab:green", "tab:blue"), "dpo": ("tab:red", "tab:purple")}

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        with_rm = all(p.get("rm") is not None for p in points)
        ax2 = ax.twinx() if with_rm else None
        for m, curve in curves.items():
            gold_color, rm_color = colors.get(m, (None, None))
            kl = [p["kl"] for p in curve]
            ax.plot(kl, [p["gold"] for p in curve], "o-", color=gold_color,
                    label=f"gold score ({m.upper()})")
            for p in curve[len(origin):]:
                ax.annotate(f"{'update' if m == 'ppo' else 'step'} {p['update']}",
                            (p["kl"], p["gold"]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
            if ax2 is not None:
                ax2.plot(kl, [p["rm"] for p in curve], "s--", color=rm_color,
                         label=f"RM score ({m.upper()})")
        ax.set_xlabel("KL(policy || SFT), nats per response")
        ax.set_ylabel("gold score")
        handles, labels = ax.get_legend_handles_labels()
        if ax2 is not None:
            ax2.set_ylabel("reward model score (normalized)")
            more = ax2.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        # Below the axes: inside, a legend can hide the very points the plot is about.
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
                  fontsize=8, frameon=False)

    rows = [[p.get("method", "ppo"), p.get("policy"), p["update"], p["kl"], p["gold"],
             p.get("rm")] for p in points]
    return (figure_img("overoptimization", draw, "Overoptimization: score vs KL to SFT")
            + table(["method", "policy", "update / step", "KL to SFT", "gold", "RM"], rows))


def calibration_section(results: dict) -> str:
    probe = (results.get("calibration") or {}).get("policies") or {}
    if not probe:
        return missing("The calibration probe did not run.")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for name, row in probe.items():
            reliability(ax, row["bins"], f"{name} (ECE {row['ece']:.3f})")
        reliability_axes(ax)

    rows = [[name, row["accuracy"], row["mean_confidence"], row["ece"]]
            for name, row in probe.items()]
    return (figure_img("calibration_probe", draw,
                       "Calibration probe: 4-way multiple-choice definitions", size=(6.0, 5.0))
            + table(["policy", "accuracy", "mean confidence", "ECE"], rows))


def ci(summary: dict | None) -> str:
    if not summary:
        return "—"
    lo, hi = summary["ci95"]
    return f"{summary['mean']:.4f} [{lo:.4f}, {hi:.4f}]"


def results_section(results: dict) -> str:
    policies = results.get("policies") or {}
    if not policies:
        return missing("No eval stage in this run (run `rlhf eval`).")
    rows = []
    for name, r in policies.items():
        kl = r.get("kl")
        if name == "bon":
            # Its KL is the analytic log N - (N-1)/N, not an estimate from samples.
            name = f"best-of-{results.get('best_of_n')} (SFT samples, by RM; analytic KL)"
        rows.append([name, ci(r["gold"]), ci(r.get("rm")),
                     f"{ci(kl)} vs {kl['reference']}" if kl else "—",
                     r["length_mean"], r["no_eos_frac"], r["headword_violation_frac"],
                     r["length_violation_frac"], r["cost_mean"]])
    wins = [[k.replace("_", " "), ci(v)] for k, v in (results.get("win_rates") or {}).items()]
    return (table(["policy", "gold (95% CI)", "RM score (95% CI)", "KL (95% CI)",
                   "mean length (tokens)", "no EOS", "uses headword", "outside length bounds",
                   "profanity cost"], rows)
            + table(["gold win rate (ties = 1/2)", "mean (95% CI)"], wins, numeric=False)
            + f'<p class="small">{results.get("num_prompts")} held-out prompts, temperature '
              f'{results.get("temperature")}, judge {esc(results.get("judge"))}.</p>')


def samples_section(run_dir: Path) -> str:
    path = run_dir / "eval" / "samples.jsonl"
    if not path.is_file():
        return missing("No eval samples.")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:NUM_SAMPLES] if line]
    names = [n for n in ("sft", "ppo", "dpo") if rows and n in rows[0]]

    def cell(r, name):
        s = r[name]
        return f"{s['response']}  (gold {s['gold']:.3f})"

    return table(["prompt", "reference", *[f"{n.upper()} response" for n in names]],
                 [[r["prompt"], r["reference"], *[cell(r, n) for n in names]] for r in rows],
                 numeric=False)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build(run_dir: Path) -> str:
    """The report's HTML for the run in ``run_dir``."""
    manifests = {}
    for stage in STAGES:
        m = read_manifest(run_dir / stage) if (run_dir / stage).is_dir() else None
        if m is not None and m.get("status") == "complete":
            manifests[stage] = m
    results_path = run_dir / "eval" / "results.json"
    results = (json.loads(results_path.read_text())
               if "eval" in manifests and results_path.is_file() else {})
    sections = [
        ("Lineage", lineage(run_dir, manifests)),
        ("Supervised fine-tuning", sft_section(run_dir, manifests.get("sft"))),
        ("Reward model", rm_section(manifests.get("rm"))),
        ("PPO", ppo_section(run_dir, manifests.get("ppo"))),
        ("Evaluation: base vs SFT vs PPO", results_section(results)),
        ("Overoptimization (Gao et al. 2022)", overoptimization_section(results)),
        ("Calibration probe", calibration_section(results)),
        ("Samples", samples_section(run_dir)),
    ]
    body = "".join(f"<h2>{esc(title)}</h2>\n{content}\n" for title, content in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>RLHF report: {esc(run_dir.name)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>RLHF report: {esc(run_dir.name)}</h1>\n"
            f'<p class="small">{esc(run_dir.resolve())}</p>\n{body}</body></html>\n')


def run(cfg: Config) -> Path:
    """Write ``<run_dir>/report.html`` atomically; returns the run folder."""
    run_dir = cfg.run_dir
    if not run_dir.is_dir():
        raise PipelineError(f"report: {run_dir} does not exist (run some stages first)")
    atomic_write_text(run_dir / REPORT, build(run_dir))
    return run_dir

"""The run report: one self-contained HTML file, ``<run_dir>/report.html``.

Plots are inline base64 PNGs drawn with matplotlib's Agg backend and the CSS is inline, so the
file opens from disk with no network, no external assets and no JavaScript. Every section works
with whatever stages exist; a missing stage's section says so. Policies, curves and settings are
read from the run's own files (eval results, metrics.jsonl, config.yaml), so a policy or a
metric added later appears without a change here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.ticker
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import Config, flatten, key_matches, to_dict  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.hub import describe_base  # noqa: E402
from pipeline.lifecycle import Outcome, Stage  # noqa: E402
from pipeline.normalization import RewardNormalization  # noqa: E402
from pipeline.rundir import (  # noqa: E402
    MANIFEST,
    STAGES,
    atomic_write_text,
    file_sha256,
    ppo_algorithm,
    read_manifest,
)
from pipeline.training import STAGE_INPUTS  # noqa: E402

REPORT = "report.html"
# Written by `rlhf scaling` (stages/scaling.py) in the run folder.
SCALING_JSON = "scaling.json"
# Sample prompts shown in the report (each with every policy's response).
NUM_SAMPLES = 12

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-bottom: .3em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-family: monospace; }
td.policy { white-space: nowrap; }
tr.set td { background: #fff6d5; }
tbody.prompt { border-top: 3px solid #888; }
img.plot { max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }
p.missing { color: #a33; font-style: italic; }
.small { font-size: 0.85em; color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
.grid table { font-size: 0.8em; }
.grid td { max-width: 22em; overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: 0.85em; }
"""

# Curve groups of a stage's metrics.jsonl: (title, key prefixes). A key no group claims goes
# to "Other", so every logged number is plotted.
CURVE_GROUPS = (
    ("Objective", ("objective/",)),
    ("Reward terms", ("reward/",)),
    ("Policy", ("policy/", "loss/policy", "loss/ptx")),
    ("Value function", ("val/", "loss/value")),
    ("Responses", ("response/",)),
    ("Training", ("train/",)),
    ("Held-out evaluation", ("eval/",)),
    ("Reward normalization", ("norm/",)),
    ("Learning rates", ("lr/",)),
    ("Timing and throughput", ("time/", "perf/")),
)
# Keys sharing a prefix here share one panel (same unit), each with its own marker and line:
# prefix -> the panel's title.
OVERLAYS = {"time/": "seconds per update (time/*)", "lr/": "learning rate (lr/*)"}
# Columns of metrics.jsonl rows that are not curves.
NOT_CURVES = ("step", "time")


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
    if isinstance(value, (list, dict)):
        return esc(json.dumps(value))
    return esc(value)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json(path: Path, text: str | None = None, line: int | None = None):
    """``path``'s JSON (or that of one of its lines), refused with one line naming it."""
    try:
        return json.loads(path.read_text() if text is None else text)
    except json.JSONDecodeError as exc:
        where = f"{path}:{line}" if line is not None else str(path)
        raise PipelineError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                            ) from None


def read_metrics(path: Path) -> list[dict]:
    """Rows of a stage's metrics.jsonl ([] when it has none)."""
    if not path.is_file():
        return []
    return [read_json(path, text, i) for i, text in enumerate(path.read_text().splitlines(), 1)
            if text.strip()]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def style(i: int, n_points: int = 0) -> dict:
    """Plot style of the i-th series of an axes: colour, marker and line all differ, so two
    series that coincide stay visible (a dashed line over a solid one, markers apart)."""
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    lines = ("-", "--", "-.", ":")
    return {"color": colors[i % len(colors)], "marker": markers[i % len(markers)],
            "linestyle": lines[i % len(lines)], "markersize": 4 + (i % 3), "linewidth": 1.4,
            "markevery": max(1, n_points // 25), "markerfacecolor": "none" if i % 2 else None}


def legend_outside(ax, ncol: int = 1) -> None:
    """The legend under the axes: inside, it can hide the very points the plot is about."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=ncol, fontsize=8,
              frameon=False)


def figure_img(name: str, draw: Callable, title: str, size=(7.0, 4.0)) -> str:
    """Draw with ``draw(fig)`` and return an <img> with the PNG inline."""
    fig = plt.figure(figsize=size, dpi=100, layout="constrained")
    try:
        draw(fig)
        fig.suptitle(title)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="plot" data-plot="{esc(name)}" alt="{esc(title)}" '
            f'src="data:image/png;base64,{data}" '
            "onerror=\"document.body.setAttribute('data-broken','1')\">")


def table(headers: list[str], rows: list[list], numeric: bool = True,
          classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        (f'<tr class="{classes[i]}">' if classes and classes[i] else "<tr>") + "".join(
            f'<td class="num">{fmt(v)}</td>' if numeric and is_number(v) else f"<td>{fmt(v)}</td>"
            for v in row) + "</tr>"
        for i, row in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def raw_table(headers: list[str], rows: list[list[str]]) -> str:
    """A table of cells that are already HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def link(run_dir: Path, target: Path, text: str | None = None) -> str:
    """A link to a folder or file: relative when it is in this run or a sibling run (so a
    copied runs folder keeps its links), else absolute."""
    try:
        href = os.path.relpath(target, run_dir)
    except ValueError:  # another drive (Windows)
        href = "../../"
    if href.startswith("../../"):
        href = Path(target).resolve().as_uri()
    if Path(target).is_dir():
        href += "/"
    return f'<a href="{esc(href)}">{esc(text or href)}</a>'


def markdown_code(text: str) -> str:
    """Escaped text with its `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(text))


def when(created: str | None) -> str:
    """An ISO time as "2026-12-01 10:55 UTC"."""
    if not created:
        return "—"
    text = created.replace("T", " ")
    return text[:16] + " UTC" if text.endswith("+00:00") else text


def policy_label(name: str, results: dict, short: bool = False) -> str:
    """A policy's name in tables; the PPO policy's says how its advantages were estimated
    unless ``short``."""
    if name == "bon":
        return f"best-of-{results.get('best_of_n')}"
    algo = results.get("ppo_algorithm")
    if name == "ppo" and algo and not short:
        return f"PPO ({algo['label']})"
    return "base" if name == "base" else name.upper()


def reliability(ax, bins: list[dict], label: str, i: int = 0) -> None:
    """Reliability diagram: accuracy against mean confidence of each non-empty bin."""
    used = [b for b in bins if b.get("count")]
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], label=label,
            **style(i + 1))


def reliability_axes(ax, ncol: int = 1) -> None:
    ax.plot([0, 1], [0, 1], color="k", linestyle=":", linewidth=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    legend_outside(ax, ncol)


# ---------------------------------------------------------------------------------------------
# Curves: every number a stage logged, grouped
# ---------------------------------------------------------------------------------------------


def curve_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in NOT_CURVES and is_number(v):
                keys.setdefault(k)
    return list(keys)


def group_curves(keys: list[str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {title: [] for title, _ in CURVE_GROUPS}
    groups["Other"] = []
    for key in keys:
        title = next((t for t, prefixes in CURVE_GROUPS
                      if any(key.startswith(p) for p in prefixes)), "Other")
        groups[title].append(key)
    return [(title, ks) for title, ks in groups.items() if ks]


def panels(keys: list[str]) -> list[list[str]]:
    """Keys to plot together: one panel per key, except the overlaid prefixes."""
    out: list[list[str]] = []
    shared: dict[str, list[str]] = {}
    for key in keys:
        prefix = next((p for p in OVERLAYS if key.startswith(p)), None)
        if prefix is None:
            out.append([key])
        elif prefix in shared:
            shared[prefix].append(key)
        else:
            shared[prefix] = [key]
            out.append(shared[prefix])
    return out


def curve_figures(stage: str, rows: list[dict], xlabel: str, skip: tuple[str, ...] = ()) -> str:
    """One figure per curve group; constant curves are listed rather than drawn."""
    out = []
    for title, keys in group_curves([k for k in curve_keys(rows) if k not in skip]):
        drawn, constant = [], []
        for key in keys:
            values = series(rows, key)[1]
            (constant if len(values) > 1 and len(set(values)) == 1 else drawn).append(key)
        groups = panels(drawn)
        if groups:
            cols = min(3, len(groups))
            nrows = math.ceil(len(groups) / cols)

            def draw(fig, groups=groups, cols=cols, nrows=nrows):
                for i, group in enumerate(groups):
                    ax = fig.add_subplot(nrows, cols, i + 1)
                    for j, key in enumerate(group):
                        xs, ys = series(rows, key)
                        ax.plot(xs, ys, label=key, **style(j, len(xs)))
                    prefix = group[0].split("/")[0] + "/"
                    ax.set_title(group[0] if len(group) == 1 else OVERLAYS[prefix], fontsize=9)
                    ax.set_xlabel(xlabel, fontsize=8)
                    ax.tick_params(labelsize=7)
                    if len(group) > 1:
                        legend_outside(ax, ncol=2)

            slug = f"{stage}_{title.lower().replace(' ', '_')}"
            out.append(figure_img(slug, draw, f"{stage.upper()}: {title.lower()}",
                                  size=(3.6 * cols, 2.7 * nrows + 0.5)))
        if constant:
            out.append('<p class="small">Constant over the run: ' + ", ".join(
                f"{esc(k)} = {fmt(series(rows, k)[1][0])}" for k in constant) + ".</p>")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Configuration, model and lineage
# ---------------------------------------------------------------------------------------------


def stage_config(run_dir: Path, stage: str) -> dict:
    path = run_dir / stage / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        values = None
    return flatten(values) if isinstance(values, dict) else {}


def relevant(keys: list[str], config: dict) -> list[str]:
    """Drop settings that do nothing here: a LoRA adapter's settings when it is off, the
    random-init sizes of a pretrained model."""
    def unused(key: str) -> bool:
        head, _, rest = key.partition(".lora.")
        if rest and rest != "enabled" and config.get(f"{head}.lora.enabled") is False:
            return True
        return key.startswith("model.scratch.") and config.get("model.init") != "scratch"

    return [k for k in keys if not unused(k)]


def stage_keys(stage: str, config: dict) -> list[str]:
    """The settings a stage reads, the model's aside (they have their own table)."""
    patterns = STAGE_INPUTS.get(stage, (f"{stage}.", f"data.{stage}", "run.seed"))
    return relevant([k for k in config if key_matches(k, patterns)
                     and not k.startswith("model.")], config)


def settings_table(keys: list[str], config: dict, defaults: dict) -> str:
    """The settings that differ from the defaults, then every setting behind a toggle."""
    rows, classes = [], []
    for key in keys:
        value, default = config[key], defaults.get(key, "—")
        rows.append([key, value, default])
        classes.append("set" if value != default else "")
    changed = [row for row, c in zip(rows, classes) if c]
    shown = (table(["set", "value", "default"], changed, numeric=False) if changed
             else '<p class="small">Every setting at its default.</p>')
    return (shown + f"<details><summary>all {len(rows)} settings</summary>"
            + table(["key", "value", "default"], rows, numeric=False, classes=classes)
            + "</details>")


def config_section(run_dir: Path, manifests: dict[str, dict]) -> str:
    if not manifests:
        return missing(f"No finished stages in {run_dir}.")
    defaults = flatten(to_dict(Config()))
    configs = {stage: stage_config(run_dir, stage) for stage in manifests}
    first = next((s for s in ("sft", *manifests) if configs.get(s)), None)
    if first is None:
        return missing("No stage of this run kept its config.yaml.")
    sft = manifests.get("sft") or {}
    metrics = sft.get("metrics", {})
    model = [["base weights", markdown_code(describe_base([sft or manifests[first]]))],
             ["parameters (trainable / total)",
              f"{metrics.get('trainable_params', '?')} / {metrics.get('total_params', '?')}"
              if metrics else "—"],
             ["tokenizer sha256", str(sft.get("tokenizer_sha256") or "—")[:16]]]
    model_keys = relevant([k for k in configs[first] if k.startswith("model.")], configs[first])
    out = ['<p class="small">The settings each stage ran with, from its own config.yaml '
           "(linked): those that differ from the defaults, and all of them (highlighted where "
           "they differ) behind each toggle.</p>",
           "<h3>Model</h3>", raw_table(["", "value"], model),
           settings_table(model_keys, configs[first], defaults),
           "<h3>Stages</h3>", '<div class="grid">']
    for stage in manifests:
        if not configs[stage]:
            continue
        out.append(f"<div><h3>{esc(stage)} "
                   f'<span class="small">({link(run_dir, run_dir / stage / "config.yaml", "config.yaml")})'
                   "</span></h3>"
                   + settings_table(stage_keys(stage, configs[stage]), configs[stage], defaults)
                   + "</div>")
    out.append("</div>")
    return "".join(out)


def stage_summary(stage: str, m: dict) -> str:
    """A stage's main numbers in a sentence (every metric is in the row's details)."""
    def g(key):
        v = m.get(key)
        return f"{v:.4g}" if is_number(v) else "?"

    if stage == "sft" and "eval_loss_after" in m:
        return (f"held-out loss {g('eval_loss_before')} → {g('eval_loss_after')} in "
                f"{g('steps')} steps on {g('train_rows')} rows")
    if stage == "label" and "rows" in m:
        return (f"{g('rows')} prompts ranked, K = {g('k')}; annotators agree with gold on "
                f"{g('agreement_with_gold')} of pairs")
    if stage == "rm" and "eval_accuracy_after" in m:
        gold = (f" (gold {g('eval_accuracy_gold_before')} → {g('eval_accuracy_gold_after')})"
                if "eval_accuracy_gold_after" in m else "")
        return (f"held-out pair accuracy {g('eval_accuracy_before')} → "
                f"{g('eval_accuracy_after')}{gold} in {g('steps')} steps")
    if stage == "ppo" and "updates" in m:
        parts = [f"{g('updates')} updates"]
        for name, what in (("scores", "score"), ("kl", "KL"), ("gold", "gold")):
            if f"{name}_end" in m:
                parts.append(f"{what} {g(name + '_start')} → {g(name + '_end')}")
        return "; ".join(parts)
    if stage == "dpo" and "eval_accuracy_after" in m:
        return (f"held-out pair accuracy {g('eval_accuracy_before')} → "
                f"{g('eval_accuracy_after')}, reward margin {g('eval_reward_margin_before')} → "
                f"{g('eval_reward_margin_after')} in {g('steps')} steps on "
                f"{g('train_pairs')} pairs")
    if stage == "eval":
        golds = [f"{k[5:]} {g(k)}" for k in m if k.startswith("gold_")]
        if golds:
            return "mean gold score: " + ", ".join(golds)
    shown = [f"{k} = {fmt(v)}" for k, v in m.items() if is_number(v)][:6]
    return "; ".join(shown)


def lineage(run_dir: Path, manifests: dict[str, dict]) -> str:
    if not manifests:
        return missing(f"No finished stages in {run_dir}.")
    rows = []
    for stage, m in manifests.items():
        parents = []
        for role, ref in m.get("parents", {}).items():
            path = Path(ref["path"])
            current = (path / MANIFEST).is_file() and file_sha256(path / MANIFEST) == ref.get(
                "manifest_sha256")
            note = "" if current else " (changed or gone since)"
            parents.append(f"{esc(role)}: {link(run_dir, path, ref['path'])}{esc(note)}")
        metrics = m.get("metrics", {})
        details = ("<details><summary>all metrics</summary>"
                   + table(["metric", "value"], [[k, v] for k, v in metrics.items()])
                   + "</details>") if metrics else ""
        model = (link(run_dir, run_dir / stage / "model", "model/")
                 if (run_dir / stage / "model").is_dir() else "—")
        scratch = (m.get("extras") or {}).get("init") == "scratch"
        base = m.get("base_model") or ("none (random init)" if scratch else "—")
        rows.append([esc(stage), link(run_dir, run_dir / stage), esc(when(m.get("created"))),
                     esc(str(m.get("git_sha"))[:12]), "<br>".join(parents) or "—", esc(base),
                     model, esc(stage_summary(stage, metrics)) + details])
    return raw_table(["stage", "folder", "finished", "git sha", "consumed", "base model",
                      "model", "result"], rows)


# ---------------------------------------------------------------------------------------------
# Stage sections
# ---------------------------------------------------------------------------------------------


def sft_section(run_dir: Path, manifest: dict | None) -> str:
    if manifest is None:
        return missing("No SFT stage in this run.")
    rows = read_metrics(run_dir / "sft" / "metrics.jsonl")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for i, key in enumerate(("train/loss", "eval/loss")):
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, label=key, **style(i, len(xs)))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats / token)")
        legend_outside(ax, ncol=2)

    m = manifest.get("metrics", {})
    return (figure_img("sft_loss", draw, "SFT loss")
            + table(["eval loss before", "eval loss after", "steps"],
                    [[m.get("eval_loss_before"), m.get("eval_loss_after"), m.get("steps")]])
            + curve_figures("sft", rows, "optimizer step", skip=("train/loss", "eval/loss")))


def rm_section(run_dir: Path, manifest: dict | None) -> str:
    if manifest is None:
        return missing("No reward-model stage in this run.")
    m = manifest.get("metrics", {})
    extras = manifest.get("extras", {})
    bins = extras.get("calibration") or []
    labels = [k for k in ("eval_accuracy", "eval_accuracy_gold", "eval_ece")
              if f"{k}_before" in m or f"{k}_after" in m]

    def draw(fig):
        ax = fig.add_subplot(1, 2 if bins else 1, 1)
        x = range(len(labels))
        for i, (when, shift, hatch) in enumerate((("before", -0.2, "//"), ("after", 0.2, ""))):
            ax.bar([j + shift for j in x], [m.get(f"{k}_{when}") or 0 for k in labels], 0.4,
                   label=when, color=style(i)["color"], hatch=hatch, edgecolor="black")
        ax.set_xticks(list(x), [k.replace("eval_", "") for k in labels], fontsize=8)
        ax.set_ylim(0, 1)
        legend_outside(ax, ncol=2)
        ax.set_title("held-out pairs", fontsize=9)
        if bins:
            ax2 = fig.add_subplot(1, 2, 2)
            reliability(ax2, bins, "reward model (after)")
            reliability_axes(ax2, ncol=2)
            ax2.set_title("calibration of pairwise preference", fontsize=9)

    rows = [[k.replace("eval_", ""), m.get(f"{k}_before"), m.get(f"{k}_after")] for k in labels]
    note = "" if bins else missing("The reward model's manifest has no calibration bins.")
    try:
        n = RewardNormalization.from_extras(extras, run_dir / "rm" / MANIFEST)
        norm = (f'<p class="small">PPO reads this model\'s score as (score + {fmt(n.bias)}) × '
                f"{fmt(n.scale)}: mean 0, std 1 on {fmt(n.samples)} samples of the SFT "
                "policy.</p>")
    except PipelineError as exc:
        norm = missing(str(exc))
    return (figure_img("rm_accuracy", draw, "Reward model: accuracy and calibration",
                       size=(9.0, 4.2))
            + table(["metric", "before", "after"], rows) + note + norm
            + curve_figures("rm", read_metrics(run_dir / "rm" / "metrics.jsonl"),
                            "optimizer step"))


def curves_section(run_dir: Path, stage: str, manifest: dict | None, xlabel: str) -> str:
    """A stage shown by its logged curves alone (PPO, DPO)."""
    if manifest is None:
        return missing(f"No {stage.upper()} stage in this run.")
    figures = curve_figures(stage, read_metrics(run_dir / stage / "metrics.jsonl"), xlabel)
    if not figures:
        return missing(f"The {stage.upper()} stage logged no curves.")
    note = ""
    if stage == "ppo":
        algo = ppo_algorithm(manifest)
        k = algo["samples_per_prompt"]
        note = (f'<p class="small">Advantage estimator: {esc(algo["label"])} ({k} response'
                f'{"s" if k > 1 else ""} per prompt, KL in the {esc(algo["kl_in"])}, '
                f'{"with a" if algo["critic"] else "no"} critic).</p>')
    return note + figures


def overoptimization_curves(results: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """The eval's gold-vs-KL points: the SFT origin, and each method's (ppo, dpo) own points
    in their order. Results written before DPO existed have PPO points only and no "method"."""
    points = results.get("overoptimization") or []
    origin = [p for p in points if p.get("method", p.get("policy")) == "sft"]
    curves: dict[str, list[dict]] = {}
    for p in points:
        if p not in origin:
            curves.setdefault(p.get("method", "ppo"), []).append(p)
    return origin, curves


def overoptimization_section(results: dict) -> str:
    points = results.get("overoptimization") or []
    if not points:
        return missing("No PPO or DPO policy was evaluated, so there is no overoptimization "
                       "view.")

    # One curve per method (PPO, DPO), each starting from the shared SFT point.
    origin, own = overoptimization_curves(results)
    curves = {m: origin + pts for m, pts in own.items()}

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        with_rm = all(p.get("rm") is not None for p in points)
        ax2 = ax.twinx() if with_rm else None
        for i, (m, curve) in enumerate(curves.items()):
            kl = [p["kl"] for p in curve]
            ax.plot(kl, [p["gold"] for p in curve], label=f"gold score ({m.upper()})",
                    **style(i))
            for p in curve[len(origin):]:
                ax.annotate(f"{'update' if m == 'ppo' else 'step'} {p['update']}",
                            (p["kl"], p["gold"]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
            if ax2 is not None:
                ax2.plot(kl, [p["rm"] for p in curve], label=f"RM score ({m.upper()})",
                         **style(len(curves) + i))
        ax.set_xlabel("KL(policy || SFT), nats per response")
        ax.set_ylabel("gold score")
        handles, labels = ax.get_legend_handles_labels()
        if ax2 is not None:
            ax2.set_ylabel("reward model score (normalized)")
            more = ax2.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
                  fontsize=8, frameon=False)

    rows = [[p.get("method", "sft" if p in origin else "ppo"), p.get("policy"), p["update"],
             p["kl"], p["gold"], p.get("rm")] for p in points]
    return (figure_img("overoptimization", draw, "Overoptimization: score vs KL to SFT")
            + table(["method", "policy", "update / step", "KL to SFT", "gold", "RM"], rows))


def interval_text(value, low, high) -> str:
    if value is None:
        return "—"
    if low is None or high is None:
        return f"{value:.4g}"
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"


def _scaling_fit_plot(record: dict, measured: dict | None) -> str:
    """A fit of small runs: the points, the curve with its band, the prediction at the full
    size with its interval for one new run, and the measured value with its own."""
    level = (record.get("fit") or {}).get("level", 0.95)

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        if record.get("curve"):
            c = record["curve"]
            xs = [q["x"] for q in c]
            ax.plot(xs, [q["y"] for q in c], label=f"fit: {record['fit']['form']}",
                    **{**style(0), "marker": None})
            ax.fill_between(xs, [q["curve_low"] for q in c], [q["curve_high"] for q in c],
                            color=style(0)["color"], alpha=0.15, label=f"fit {level:.0%} band")
        pts = record.get("points") or []
        yerr = None
        if pts and all(p.get("low") is not None for p in pts):
            yerr = [[p["y"] - p["low"] for p in pts], [p["high"] - p["y"] for p in pts]]
        ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts], yerr=yerr, fmt="o",
                    color="black", capsize=3, label="small runs")
        pred = record.get("predicted")
        if pred:
            ax.errorbar([pred["x"]], [pred["value"]], fmt="s", capsize=5, color=style(1)["color"],
                        yerr=[[pred["value"] - pred["low"]], [pred["high"] - pred["value"]]],
                        label=f"predicted ({level:.0%}, one new run)")
        if measured and measured.get("value") is not None:
            m_err = None
            if measured.get("low") is not None:
                m_err = [[measured["value"] - measured["low"]],
                         [measured["high"] - measured["value"]]]
            ax.errorbar([measured["x"]], [measured["value"]], yerr=m_err, fmt="*",
                        markersize=12, capsize=5, color=style(2)["color"], label="measured")
        if record.get("target"):
            ax.axhline(record["target"]["target"], color="grey", linestyle=":",
                       label=f"target {record['target']['target']:g}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(record.get("x_name", "x"))
        ax.set_ylabel(record.get("y_name", "y"), fontsize=8)
        legend_outside(ax, ncol=3)

    return figure_img(f"scaling_{record['id'].replace('.', '_')}", draw,
                      f"{record['id']}: predicted before the full run", size=(7.0, 4.4))


def _holdout_plot(record: dict) -> str:
    """Gao et al.'s fit on the early points, its predictions at the later ones, and the fit on
    all points with the predicted peak."""

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        if record.get("curve"):
            c = record["curve"]
            ax.plot([q["x"] for q in c], [q["y"] for q in c], label="fit on all points",
                    **{**style(1), "marker": None})
        if record.get("early_curve"):
            c = record["early_curve"]
            xs = [q["x"] for q in c]
            ax.plot(xs, [q["y"] for q in c], label="fit on early points",
                    **{**style(0), "marker": None})
            ax.fill_between(xs, [q["curve_low"] for q in c], [q["curve_high"] for q in c],
                            color=style(0)["color"], alpha=0.15)
        pts = record.get("points") or []
        for early, label, face in ((True, "early points (fitted)", "black"),
                                   (False, "later points (held out)", "none")):
            chosen = [p for p in pts if p["early"] == early]
            ax.plot([p["d"] for p in chosen], [p["gain"] for p in chosen], "o", color="black",
                    markerfacecolor=face, label=label)
        preds = record.get("predictions") or []
        if preds:
            ax.errorbar([math.sqrt(q["kl"]) for q in preds], [q["value"] for q in preds],
                        yerr=[[q["value"] - q["low"] for q in preds],
                              [q["high"] - q["value"] for q in preds]],
                        fmt="s", capsize=4, color=style(2)["color"],
                        label="predicted from the early fit")
        peak = record.get("peak") or {}
        if peak.get("kl"):
            ax.axvline(math.sqrt(peak["kl"]), color="grey", linestyle=":",
                       label=f"predicted peak, KL {peak['kl']:.3g}")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("d = sqrt(KL to the start), sqrt(nats)")
        ax.set_ylabel("gold gain over the start")
        legend_outside(ax, ncol=3)

    return figure_img(f"scaling_{record['id'].replace('.', '_')}", draw,
                      f"{record['id']}: {record.get('form', 'no fit')}", size=(7.0, 4.4))


def scaling_section(doc: dict) -> str:
    """``rlhf scaling``'s fits: predicted against measured, one plot per fit."""
    records = doc.get("records") or []
    if not records:
        return missing("scaling.json holds no records yet.")
    rows = []
    for row in doc.get("summary") or []:
        rows.append([row["id"], row.get("x"),
                     interval_text(row.get("predicted"), row.get("low"), row.get("high")),
                     interval_text(row.get("measured"), row.get("measured_low"),
                                   row.get("measured_high")),
                     {True: "yes", False: "NO", None: "—"}[row.get("within_interval")],
                     {True: "yes", False: "no", None: "—"}[row.get("prediction_first")],
                     row.get("error") or row.get("note") or ""])
    out = [f'<p class="small">Intervals: {esc(doc.get("intervals"))}.</p>']
    if rows:
        out.append(table(["figure", "x (steps / comparisons / KL)", "predicted",
                          "measured", "inside", "recorded before its stage ran", "note"],
                         rows, numeric=False))
    else:
        out.append(missing("The command has not finished: no summary yet."))
    measured = {r["id"]: r for r in records if r["kind"] == "measurement"}
    for r in records:
        if r["kind"] == "prediction":
            out.append(_scaling_fit_plot(r, measured.get(r["id"])))
            notes = [f"fit: {esc(r['error'])}"] if r.get("error") else []
            if r.get("note"):
                notes.append(esc(r["note"]))
            target = r.get("target")
            if target:
                bounds = ["not reached" if v is None else f"{v:.0f}"
                          for v in (target["low"], target["high"])]
                where = (f"{target['x']:.0f} comparisons [{bounds[0]}, {bounds[1]}]"
                         if target.get("x") else
                         f"not reached by {target['x_max']:.0f} comparisons")
                notes.append(f"accuracy {target['target']:g} predicted at {where}")
            if notes:
                out.append('<p class="small">' + "; ".join(notes) + ".</p>")
        elif r["kind"] == "holdout":
            out.append(_holdout_plot(r))
            peak = r.get("peak") or {}
            notes = [esc(r.get("note", ""))]
            if peak.get("kl"):
                notes.append(f"gold predicted to peak at KL {peak['kl']:.3g} [{peak['low']:.3g}, "
                             f"{peak['high']:.3g}]" + (" (beyond the points)"
                                                      if peak.get("beyond_points") else ""))
            elif peak.get("reason"):
                notes.append(f"no peak: {esc(peak['reason'])}")
            for key in ("error", "early_error"):
                if r.get(key):
                    notes.append(f"{key.replace('_', ' ')}: {esc(r[key])}")
            out.append('<p class="small">' + "; ".join(notes) + ".</p>")
    return "".join(out)


def calibration_section(results: dict) -> str:
    probe = (results.get("calibration") or {}).get("policies") or {}
    if not probe:
        return missing("The calibration probe did not run.")

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for i, (name, row) in enumerate(probe.items()):
            reliability(ax, row["bins"],
                        f"{policy_label(name, results)} (ECE {row['ece']:.3f})", i)
        reliability_axes(ax, ncol=2)

    rows = [[policy_label(name, results), row["accuracy"], row["mean_confidence"], row["ece"]]
            for name, row in probe.items()]
    return (figure_img("calibration_probe", draw,
                       "Calibration probe: 4-way multiple-choice definitions", size=(6.0, 5.5))
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
        label = policy_label(name, results)
        if name == "bon":
            # Its KL is the analytic log N - (N-1)/N, not an estimate from samples.
            label += " (SFT samples, by RM; analytic KL)"
        rows.append([label, ci(r["gold"]), ci(r.get("rm")),
                     f"{ci(kl)} vs {kl['reference']}" if kl else "—",
                     r["length_mean"], r["no_eos_frac"], r["headword_violation_frac"],
                     r["length_violation_frac"], r["cost_mean"]])
    wins = [[" vs ".join(policy_label(n, results) for n in k.split("_vs_")), ci(v)]
            for k, v in (results.get("win_rates") or {}).items()]
    return (table(["policy", "gold (95% CI)", "RM score (95% CI)", "KL (95% CI)",
                   "mean length (tokens)", "no EOS", "uses headword", "outside length bounds",
                   "profanity cost"], rows)
            + reward_terms_table(results)
            + table(["gold win rate (ties = 1/2)", "mean (95% CI)"], wins, numeric=False)
            + f'<p class="small">{results.get("num_prompts")} held-out prompts, temperature '
              f'{results.get("temperature")}, judge {esc(results.get("judge"))}.</p>')


def reward_terms_table(results: dict) -> str:
    """Per policy, the mean of each term of the reward PPO trained on (as eval measured it on
    the policy's own samples) and of their weighted sum."""
    policies = {name: r["reward_terms"] for name, r in (results.get("policies") or {}).items()
                if r.get("reward_terms")}
    if not policies:
        return ""
    spec = results.get("reward_spec") or {}
    weights = {t["key"]: t["weight"] for t in spec.get("terms", [])}
    keys = list(dict.fromkeys(k for terms in policies.values() for k in terms))
    headers = [f"{k} (weight {fmt(weights[k])})" if k in weights else
               {"score": "score PPO trained on", "constraint_cost": "constraint cost"}.get(k, k)
               for k in keys]
    rows = [[policy_label(name, results), *[terms.get(k) for k in keys]]
            for name, terms in policies.items()]
    note = ("" if "score" in keys else " Without a reward model in this eval the model term, "
            "and so the score, is not measured.")
    return ('<p class="small">The terms of the reward PPO trained on (ppo.rewards), per '
            "policy on its own samples; the score subtracts ppo.missing_eos_penalty for a "
            "response without EOS" + (", and the costs go to the constraint instead"
                                      if spec.get("lagrangian") else "")
            + f".{note}</p>" + table(["policy", *headers], rows))


def sample_policies(rows: list[dict], results: dict) -> list[str]:
    """The policies with a response in the samples: those of the results in their order,
    then any other entry that holds a response."""
    found = [k for k, v in rows[0].items() if isinstance(v, dict) and "response" in v]
    order = [k for k in (results.get("policies") or {}) if k in found]
    return order + [k for k in found if k not in order]


def samples_section(run_dir: Path, results: dict) -> str:
    path = run_dir / "eval" / "samples.jsonl"
    if not path.is_file():
        return missing("No eval samples.")
    rows = [read_json(path, text, i)
            for i, text in enumerate(path.read_text().splitlines()[:NUM_SAMPLES], 1) if text]
    if not rows:
        return missing("The eval stage wrote no samples.")
    names = sample_policies(rows, results)
    has_rm = any(isinstance(r[n].get("rm"), (int, float)) for r in rows for n in names)
    head = "".join(f"<th>{h}</th>" for h in ["prompt", "policy", "response", "gold",
                                             *(["RM"] if has_rm else [])])
    bodies = []
    for r in rows:
        lines = []
        for i, name in enumerate(names):
            s = r[name]
            first = (f'<td rowspan="{len(names)}">{esc(r.get("prompt"))}'
                     f'<div class="small">reference: {esc(r.get("reference"))}</div></td>'
                     if i == 0 else "")
            cells = [esc(s.get("response")), fmt(s.get("gold")),
                     *([fmt(s.get("rm"))] if has_rm else [])]
            lines.append(f'<tr data-policy="{esc(name)}">{first}'
                         f'<td class="policy">{esc(policy_label(name, results))}</td>'
                         + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        bodies.append('<tbody class="prompt">' + "".join(lines) + "</tbody>")
    return (f'<p class="small">The first {len(rows)} held-out prompts; every policy\'s response '
            "to each, with its gold score" + (" and normalized reward-model score" if has_rm
                                               else "") + ".</p>"
            f"<table><tr>{head}</tr>{''.join(bodies)}</table>")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def read_run(run_dir: Path) -> tuple[dict[str, dict], dict]:
    """The manifests of the run's complete stages, and its eval results ({} without)."""
    manifests = {}
    for stage in STAGES:
        m = read_manifest(run_dir / stage) if (run_dir / stage).is_dir() else None
        if m is not None and m.get("status") == "complete":
            manifests[stage] = m
    results_path = run_dir / "eval" / "results.json"
    results = (read_json(results_path)
               if "eval" in manifests and results_path.is_file() else {})
    return manifests, results


def build(run_dir: Path) -> str:
    """The report's HTML for the run in ``run_dir``."""
    manifests, results = read_run(run_dir)
    compared = " vs ".join(policy_label(n, results, short=True)
                           for n in results.get("policies") or {})
    sections = [
        ("config", "Configuration and model", config_section(run_dir, manifests)),
        ("lineage", "Lineage", lineage(run_dir, manifests)),
        ("sft", "Supervised fine-tuning", sft_section(run_dir, manifests.get("sft"))),
        ("rm", "Reward model", rm_section(run_dir, manifests.get("rm"))),
        ("ppo", "PPO", curves_section(run_dir, "ppo", manifests.get("ppo"), "update")),
        # DPO is opt-in (pipeline.stages): its section is there when the run has the stage.
        *([("dpo", "DPO", curves_section(run_dir, "dpo", manifests["dpo"], "optimizer step"))]
          if "dpo" in manifests else []),
        ("eval", f"Evaluation: {compared}" if compared else "Evaluation",
         results_section(results)),
        ("overoptimization", "Overoptimization (Gao et al. 2022)",
         overoptimization_section(results)),
        *([("scaling", "Predicting the run (scaling fits)",
            scaling_section(json.loads((run_dir / SCALING_JSON).read_text())))]
          if (run_dir / SCALING_JSON).is_file() else []),
        ("calibration", "Calibration probe", calibration_section(results)),
        ("samples", "Samples", samples_section(run_dir, results)),
    ]
    nav = "".join(f'<a href="#{slug}">{esc(title.split(":")[0])}</a>'
                  for slug, title, _ in sections)
    body = "".join(f'<h2 id="{slug}">{esc(title)}</h2>\n{content}\n'
                   for slug, title, content in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>RLHF report: {esc(run_dir.name)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>RLHF report: {esc(run_dir.name)}</h1>\n"
            f'<p class="small">{esc(run_dir.resolve())}</p>\n<nav>{nav}</nav>\n{body}'
            "</body></html>\n")


class Report(Stage):
    """The report is one file beside the stage folders, rewritten atomically: nothing is
    cleared at start, and what it reads is checked first."""

    name = "report"

    def make_accelerator(self):
        return None

    def check(self) -> None:
        self.run_dir = self.cfg.run_dir
        if not self.run_dir.is_dir():
            raise PipelineError(f"report: {self.run_dir} does not exist (run some stages first)")
        read_run(self.run_dir)

    def start(self) -> None:
        pass

    def body(self) -> Outcome:
        self.html = build(self.run_dir)
        return Outcome({})

    def finish(self, outcome: Outcome) -> Path:
        atomic_write_text(self.run_dir / REPORT, self.html)
        return self.run_dir

    def done(self, path: Path) -> str:
        return f"[report] written: {path / REPORT}"


def run(cfg: Config) -> Path:
    """Write ``<run_dir>/report.html`` atomically; returns the run folder."""
    return Report(cfg).run()

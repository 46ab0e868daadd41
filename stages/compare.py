"""``rlhf compare RUN_DIR [RUN_DIR ...]``: finished runs side by side.

One row per run and trained policy (PPO, DPO, best-of-N), read from each run's
``eval/results.json`` and, for the training time, its ``ppo``/``dpo`` stage folders. Rows are
grouped by label (the report's policy label, so each PPO advantage estimator is its own group)
or by policy, and each group gets its mean and spread across seeds. Output, written atomically
to ``--out`` once every run has been read: ``compare.json`` (the rows, the groups and the runs),
``compare.md`` (the tables) and ``compare.html`` (the tables, gold against KL to SFT with one
series per group, and the win rates against SFT with their CIs).

Runs of one seed are also compared head to head: each trained policy of one against the same
policy of the other, paired by eval prompt on the gold scores in their ``eval/samples.jsonl``,
which is how a change is judged against its control on the same reward model and prompts.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.rundir import atomic_write_json, atomic_write_text, read_manifest
from pipeline.seeds import markdown_table, mean_sd
from stages.report import (
    CSS,
    esc,
    figure_img,
    legend_outside,
    link,
    overoptimization_curves,
    policy_label,
    raw_table,
    read_json,
    read_metrics,
    stage_config,
    style,
    table,
    when,
)
from stages.stats import bootstrap_ci, win_outcomes

OUT = Path("runs/compare")
GROUP_BY = ("estimator", "policy")
# The policies a run trains or selects, compared against its SFT policy.
POLICIES = ("ppo", "dpo", "bon")
# Policies compared head to head between runs of one seed. Best-of-N is left out: runs of a
# seed that share a reward model hold the same best-of-N samples.
HEAD_TO_HEAD = ("ppo", "dpo")
# Bootstrap resamples (over prompts) of the head-to-head intervals, as the eval stage's default.
RESAMPLES = 1000
# Row key, column title, format: the per-row table and the per-group means.
COLUMNS = (("win_vs_sft", "vs SFT [95% CI]", "{:.3f}"),
           ("win_vs_bon", "vs best-of-N [95% CI]", "{:.3f}"),
           ("gold_sft", "gold SFT", "{:.3f}"), ("gold", "gold", "{:.3f}"),
           ("kl", "KL to SFT", "{:.2f}"), ("rm", "RM (norm.)", "{:.2f}"),
           ("length", "length", "{:.1f}"), ("train_minutes", "train minutes", "{:.1f}"),
           ("s_per_update", "s/update", "{:.1f}"))
NOTE = ("Gold win rates are paired per prompt, ties counting half. KL is to the SFT policy in "
        "nats per response (best-of-N's is the analytic log N - (N-1)/N). Train minutes: PPO's "
        "time/update summed over its updates, DPO's trainer time; s/update is PPO's median "
        "time/update. Group means are over seeds (runs of one seed averaged first); (n=...) "
        "marks a mean over fewer seeds than the group has.")
HEAD_NOTE = ("Head to head: runs of one seed, each policy against the same policy of the other "
             "run on the eval prompts both evaluated, from their eval/samples.jsonl: the first "
             "run's gold win rate (ties half) and its mean gold difference, with 95% "
             f"percentile-bootstrap CIs over prompts ({RESAMPLES} resamples).")


def _problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be compared, or None."""
    if not run_dir.is_dir():
        return f"{run_dir}: no such run folder"
    manifest = read_manifest(run_dir / "eval")
    if manifest is None or manifest.get("status") != "complete":
        state = ("no eval/manifest.json" if manifest is None
                 else f"eval status {manifest.get('status')!r}")
        return f"{run_dir}: no complete eval stage ({state}; run `rlhf eval` for it)"
    path = run_dir / "eval" / "results.json"
    if not path.is_file():
        return f"{path}: missing (the eval stage's results)"
    results = read_json(path)
    sft = (results.get("policies") or {}).get("sft") if isinstance(results, dict) else None
    if not isinstance(sft, dict) or not isinstance(sft.get("gold"), dict):
        return f"{path}: no policies.sft.gold (not an eval results file?)"
    return None


def check(run_dirs: list[Path]) -> None:
    """Every problem with the runs, in one line."""
    problems = []
    seen = set()
    for run_dir in run_dirs:
        if run_dir.resolve() in seen:
            problems.append(f"{run_dir}: given twice")
            continue
        seen.add(run_dir.resolve())
        try:
            problem = _problem(run_dir)
        except PipelineError as exc:
            problem = str(exc)
        if problem:
            problems.append(problem)
    if problems:
        raise PipelineError("compare: " + "; ".join(problems))


def seed_of(run_dir: Path) -> int | None:
    """``run.seed`` of the eval stage's config, else of the ppo or dpo stage's."""
    for stage in ("eval", "ppo", "dpo"):
        seed = stage_config(run_dir, stage).get("run.seed")
        if isinstance(seed, int):
            return seed
    return None


def win(results: dict, a: str, b: str) -> tuple[float | None, list[float] | None]:
    """``a``'s gold win rate against ``b`` with its 95% CI, from either direction."""
    wins = results.get("win_rates") or {}
    if f"{a}_vs_{b}" in wins:
        w = wins[f"{a}_vs_{b}"]
        return w["mean"], list(w["ci95"])
    if f"{b}_vs_{a}" in wins:
        w = wins[f"{b}_vs_{a}"]
        return 1 - w["mean"], [1 - w["ci95"][1], 1 - w["ci95"][0]]
    return None, None


def _complete(run_dir: Path, stage: str) -> dict | None:
    manifest = read_manifest(run_dir / stage) if (run_dir / stage).is_dir() else None
    return manifest if manifest and manifest.get("status") == "complete" else None


def train_time(run_dir: Path, policy: str) -> dict:
    """Minutes of training (and PPO's median seconds per update) where the stage is here."""
    if policy == "ppo" and _complete(run_dir, "ppo"):
        times = [r["time/update"] for r in read_metrics(run_dir / "ppo" / "metrics.jsonl")
                 if isinstance(r.get("time/update"), (int, float))]
        if times:
            return {"train_minutes": sum(times) / 60, "s_per_update": statistics.median(times)}
    if policy == "dpo" and (m := _complete(run_dir, "dpo")):
        seconds = m.get("metrics", {}).get("train_seconds")
        if isinstance(seconds, (int, float)):
            return {"train_minutes": seconds / 60}
    return {}


def run_rows(run_dir: Path, group_by: str) -> list[dict]:
    """One row per policy the run's eval holds, besides base and SFT."""
    results = read_json(run_dir / "eval" / "results.json")
    policies = results["policies"]
    sft = policies["sft"]
    origin, curves = overoptimization_curves(results)
    rows = []
    for name in POLICIES:
        p = policies.get(name)
        if not isinstance(p, dict) or not isinstance(p.get("gold"), dict):
            continue
        kl = p.get("kl") if (p.get("kl") or {}).get("reference", "sft") == "sft" else None
        # The eval's points for this method (snapshots, then the final policy), or the final
        # policy alone; best-of-N is one point at its analytic KL.
        points = [{"update": q.get("update"), "kl": q["kl"], "gold": q["gold"]}
                  for q in curves.get(name, [])]
        if not points and kl:
            points = [{"update": None, "kl": kl["mean"], "gold": p["gold"]["mean"]}]
        vs_sft, vs_sft_ci = win(results, name, "sft")
        vs_bon, vs_bon_ci = win(results, name, "bon") if name != "bon" else (None, None)
        label = policy_label(name, results)
        rows.append({
            "run": run_dir.name, "seed": seed_of(run_dir), "policy": name, "label": label,
            "group": label if group_by == "estimator" else policy_label(name, results, True),
            "win_vs_sft": vs_sft, "win_vs_sft_ci": vs_sft_ci,
            "win_vs_bon": vs_bon, "win_vs_bon_ci": vs_bon_ci,
            "gold_sft": sft["gold"]["mean"], "gold": p["gold"]["mean"],
            "kl": kl["mean"] if kl else None, "rm": (p.get("rm") or {}).get("mean"),
            "length": p.get("length_mean"), "num_prompts": results.get("num_prompts"),
            "train_minutes": None, "s_per_update": None, **train_time(run_dir, name),
            "sft_point": ({"kl": origin[0]["kl"], "gold": origin[0]["gold"]} if origin
                          else {"kl": 0.0, "gold": sft["gold"]["mean"]}),
            "points": points,
        })
    return rows


def groups(rows: list[dict]) -> list[dict]:
    """Per group, the mean and sample sd over seeds of each column; rows of one seed (runs
    that share it, such as their best-of-N) count once, as their mean."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group]
        by_seed: dict = {}
        for r in mine:
            by_seed.setdefault(r["seed"] if r["seed"] is not None else r["run"], []).append(r)
        stats = {}
        for key, _, _ in COLUMNS:
            values = [sum(vs) / len(vs) for same in by_seed.values()
                      if (vs := [r[key] for r in same if r[key] is not None])]
            if values:
                mean, sd = mean_sd(values)
                stats[key] = {"mean": mean, "sd": sd, "n": len(values)}
        out.append({"group": group, "seeds": list(by_seed), "runs": len(mine), "stats": stats})
    return out


def prompt_golds(run_dir: Path) -> dict[str, dict[str, float]] | None:
    """Per eval prompt id, the gold score of each head-to-head policy, from the run's
    ``eval/samples.jsonl``; None when the run has none."""
    path = run_dir / "eval" / "samples.jsonl"
    if not path.is_file():
        return None
    out: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["id"])] = {name: float(row[name]["gold"])
                                       for name in HEAD_TO_HEAD if name in row}
            except (ValueError, KeyError, TypeError) as exc:
                raise PipelineError(
                    f"compare: {path}:{number}: expected a JSON object with an id and each "
                    f"policy's gold score ({type(exc).__name__}: {exc})") from None
    return out


def head_to_head(run_dirs: list[Path]) -> list[dict]:
    """For each pair of runs of one seed and each policy both evaluated: the first run's gold
    win rate against the second's and the mean gold difference, paired on the prompts both
    hold, with bootstrap CIs over those prompts."""
    golds = {d: prompt_golds(d) for d in run_dirs}
    seeds = {d: seed_of(d) for d in run_dirs}
    out = []
    for i, a in enumerate(run_dirs):
        for b in run_dirs[i + 1:]:
            if seeds[a] is None or seeds[a] != seeds[b] or not golds[a] or not golds[b]:
                continue
            for name in HEAD_TO_HEAD:
                ids = [k for k, row in golds[a].items()
                       if name in row and name in golds[b].get(k, {})]
                if not ids:
                    continue
                mine = [golds[a][k][name] for k in ids]
                theirs = [golds[b][k][name] for k in ids]
                wins = win_outcomes(mine, theirs)
                diff = [x - y for x, y in zip(mine, theirs)]
                out.append({
                    "policy": name, "run": a.name, "versus": b.name, "seed": seeds[a],
                    "num_prompts": len(ids),
                    "win": sum(wins) / len(wins), "win_ci": list(bootstrap_ci(wins, RESAMPLES, 0)),
                    "gold_diff": sum(diff) / len(diff),
                    "gold_diff_ci": list(bootstrap_ci(diff, RESAMPLES, 0))})
    return out


def build(run_dirs: list[Path], group_by: str) -> dict:
    """compare.json's content: the runs, one row per run and policy, and the groups."""
    check(run_dirs)
    rows = []
    for d in run_dirs:
        try:
            rows += run_rows(d, group_by)
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise PipelineError(f"compare: {d / 'eval' / 'results.json'}: not the shape the "
                                f"eval stage writes ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise PipelineError("compare: no run's eval holds a PPO, DPO or best-of-N policy")
    order = {g: i for i, g in enumerate(dict.fromkeys(
        r["group"] for name in POLICIES for r in rows if r["policy"] == name))}
    rows.sort(key=lambda r: (order[r["group"]], r["seed"] is None, r["seed"] or 0))
    runs = []
    for d in run_dirs:
        manifest = read_manifest(d / "eval")
        runs.append({"run": d.name, "path": str(d.resolve()), "seed": seed_of(d),
                     "eval_created": manifest.get("created"), "git_sha": manifest.get("git_sha")})
    return {"group_by": group_by, "runs": runs, "rows": rows, "groups": groups(rows),
            "head_to_head": head_to_head(run_dirs)}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    ci = row.get(f"{key}_ci")
    return fmt.format(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _stat(stats: dict, key: str, fmt: str, seeds: int) -> str:
    s = stats.get(key)
    if s is None:
        return "—"
    text = fmt.format(s["mean"]) + ("" if s["sd"] is None else f" ± {fmt.format(s['sd'])}")
    return text + (f" (n={s['n']})" if s["n"] < seeds else "")


def tables(doc: dict) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list]]:
    """The per-row table and the per-group table, as headers and cells of text."""
    heads = ["run", "seed", "policy", *(title for _, title, _ in COLUMNS)]
    rows = [[r["run"], "—" if r["seed"] is None else str(r["seed"]), r["label"],
             *(_cell(r, k, f) for k, _, f in COLUMNS)] for r in doc["rows"]]
    group_heads = [doc["group_by"], "seeds", *(f"{title.split(' [')[0]} (mean ± sd)"
                                               for _, title, _ in COLUMNS)]
    group_rows = [[g["group"], str(len(g["seeds"])),
                   *(_stat(g["stats"], k, f, len(g["seeds"])) for k, _, f in COLUMNS)]
                  for g in doc["groups"]]
    return (heads, rows), (group_heads, group_rows)


HEAD_HEADS = ["policy", "run", "versus", "seed", "prompts", "win rate [95% CI]",
              "gold difference [95% CI]"]


def head_rows(doc: dict) -> list[list[str]]:
    return [[h["policy"].upper(), h["run"], h["versus"], str(h["seed"]), str(h["num_prompts"]),
             f"{h['win']:.3f} [{h['win_ci'][0]:.3f}, {h['win_ci'][1]:.3f}]",
             f"{h['gold_diff']:+.4f} [{h['gold_diff_ci'][0]:+.4f}, {h['gold_diff_ci'][1]:+.4f}]"]
            for h in doc["head_to_head"]]


def markdown(doc: dict) -> str:
    (heads, rows), (group_heads, group_rows) = tables(doc)
    text = (markdown_table(heads, rows) + "\n" + markdown_table(group_heads, group_rows)
            + "\n" + NOTE + "\n")
    if doc["head_to_head"]:
        text += "\n" + markdown_table(HEAD_HEADS, head_rows(doc)) + "\n" + HEAD_NOTE + "\n"
    return text


def gold_vs_kl(doc: dict) -> str:
    """Gold against KL to SFT: per group one colour, one line per run from its SFT point
    through its snapshots to the final policy; best-of-N as points."""
    names = [g["group"] for g in doc["groups"]]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        sft = {r["sft_point"]["gold"] for r in doc["rows"]}
        ax.plot([0.0] * len(sft), sorted(sft), "x", color="black", label="SFT (KL 0)",
                zorder=5)
        for i, name in enumerate(names):
            look = {**style(i), "markevery": 1}
            for j, r in enumerate(x for x in doc["rows"] if x["group"] == name):
                curve = r["points"] if r["policy"] == "bon" else [r["sft_point"], *r["points"]]
                ax.plot([q["kl"] for q in curve], [q["gold"] for q in curve],
                        label=name if j == 0 else None, alpha=0.8,
                        **{**look, **({"linestyle": "none"} if r["policy"] == "bon" else {})})
        ax.set_xlabel("KL(policy || SFT), nats per response")
        ax.set_ylabel("gold score")
        legend_outside(ax, ncol=3)

    return figure_img("compare_gold_vs_kl", draw,
                      "Gold vs KL to SFT: every seed and snapshot", size=(7.5, 4.8))


def win_rates(doc: dict) -> str:
    """Each row's win rate against SFT with its 95% CI, one column of dots per group, and the
    group's mean over seeds."""
    names = [g["group"] for g in doc["groups"]]

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for i, g in enumerate(doc["groups"]):
            # Runs that share a seed's best-of-N carry the same figures: drawn once.
            mine = list({(r["seed"], r["win_vs_sft"], *r["win_vs_sft_ci"]): r
                         for r in doc["rows"] if r["group"] == g["group"]
                         and r["win_vs_sft"] is not None}.values())
            for j, r in enumerate(mine):
                x = i + (j - (len(mine) - 1) / 2) * min(0.1, 0.6 / max(1, len(mine)))
                lo, hi = r["win_vs_sft_ci"]
                ax.errorbar([x], [r["win_vs_sft"]], capsize=3, color=style(i)["color"],
                            marker=style(i)["marker"],
                            yerr=[[r["win_vs_sft"] - lo], [hi - r["win_vs_sft"]]])
                if r["seed"] is not None:
                    ax.annotate(f"s{r['seed']}", (x, hi), fontsize=7, ha="center",
                                xytext=(0, 2), textcoords="offset points")
            mean = g["stats"].get("win_vs_sft")
            if mean:
                ax.hlines(mean["mean"], i - 0.3, i + 0.3, color=style(i)["color"],
                          linewidth=2)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=15)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel("gold win rate vs SFT (ties = 1/2)")

    return figure_img("compare_win_rate_vs_sft", draw,
                      "Win rate vs SFT, 95% CIs (bar: mean over seeds)", size=(7.5, 4.2))


def html(doc: dict, out: Path) -> str:
    (heads, rows), (group_heads, group_rows) = tables(doc)
    runs = [[esc(r["run"]), esc("—" if r["seed"] is None else r["seed"]),
             link(out, Path(r["path"]) / "report.html", r["path"])
             if (Path(r["path"]) / "report.html").is_file() else esc(r["path"]),
             esc(when(r["eval_created"])), esc(str(r["git_sha"])[:12])] for r in doc["runs"]]
    run_table = raw_table(["run", "seed", "folder", "eval finished", "git sha"], runs)
    title = f"RLHF comparison: {len(doc['runs'])} runs"
    heads_up = (f"<h2>Head to head</h2>{table(HEAD_HEADS, head_rows(doc), numeric=False)}"
                f'<p class="small">{esc(HEAD_NOTE)}</p>\n' if doc["head_to_head"] else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>"
            f"<h1>{esc(title)}</h1>\n<h2>Runs</h2>{run_table}\n"
            f"<h2>Policies</h2>{table(heads, rows, numeric=False)}\n"
            f"<h2>By {esc(doc['group_by'])}, over seeds</h2>"
            f"{table(group_heads, group_rows, numeric=False)}"
            f'<p class="small">{esc(NOTE)}</p>\n{heads_up}'
            f"<h2>Overoptimization</h2>{gold_vs_kl(doc)}\n"
            f"<h2>Win rate vs SFT</h2>{win_rates(doc)}\n</body></html>\n")


def run(run_dirs: list[Path], out: Path = OUT, group_by: str = "estimator") -> Path:
    """Read every run, then write ``compare.{json,md,html}`` to ``out``; returns ``out``."""
    if group_by not in GROUP_BY:
        raise ValueError(f"--group-by {group_by!r}: expected one of {', '.join(GROUP_BY)}")
    doc = build(run_dirs, group_by)
    text, page = markdown(doc), html(doc, out)
    atomic_write_json(out / "compare.json", doc)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.html", page)
    return out

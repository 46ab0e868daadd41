"""`rlhf compare`: finished runs side by side, from their eval results and ppo/dpo folders,
without a model (the run folders are written here in the shape the stages write them)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.rundir import atomic_write_json, ppo_algorithm
from stages import compare
from stages.report import overoptimization_curves

# Four PPO updates: summed 100 s, median 25 s (the upper median would be 30).
UPDATE_SECONDS = (10.0, 40.0, 20.0, 30.0)


def summary(mean: float, low: float, high: float, **extra) -> dict:
    return {"mean": mean, "ci95": [low, high], "n": 300, **extra}


def policy(gold: float, length: float, rm: float | None, kl: float | None) -> dict:
    row = {"gold": summary(gold, gold - 0.02, gold + 0.02), "length_mean": length,
           "no_eos_frac": 0.0, "headword_violation_frac": 0.1, "length_violation_frac": 0.05,
           "cost_mean": 0.05}
    if rm is not None:
        row["rm"] = summary(rm, rm - 0.1, rm + 0.1)
    if kl is not None:
        row["kl"] = summary(kl, kl - 0.3, kl + 0.3, reference="sft")
    return row


def make_run(root: Path, name: str, seed: int, *, estimator: str = "gae", k: int = 1,
             win: float, gold_sft: float = 0.40, gold: float = 0.44, kl: float = 3.0,
             bon_win: float | None = None, vs_bon: float | None = None,
             dpo_win: float | None = None) -> Path:
    """A run folder as ppo (and dpo) and eval leave it: manifests, configs, metrics, results.
    Without ``bon_win`` the eval had no reward model: no best-of-N and no RM scores."""
    run = root / name
    with_rm = bon_win is not None
    ppo_extras = {"advantage_estimator": estimator, "samples_per_prompt": k, "kl_in": "reward",
                  "critic": estimator == "gae"}
    for stage in ("eval", "ppo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "config.yaml").write_text(yaml.safe_dump(
            {"run": {"name": name, "seed": seed}, "ppo": {"advantage_estimator": estimator}}))
    atomic_write_json(run / "ppo" / "manifest.json", {
        "stage": "ppo", "status": "complete", "metrics": {"updates": len(UPDATE_SECONDS)},
        "extras": ppo_extras})
    (run / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i + 1, "time": 1e9 + i, "objective/kl": 0.1 * i, "time/update": t})
        + "\n" for i, t in enumerate(UPDATE_SECONDS)))
    policies = {"base": policy(0.35, 30.0, 0.3 if with_rm else None, None),
                "sft": policy(gold_sft, 11.0, 0.1 if with_rm else None, 19.0)}
    policies["sft"]["kl"]["reference"] = "base"
    wins = {"ppo_vs_sft": summary(win, win - 0.05, win + 0.05),
            "sft_vs_base": summary(0.57, 0.51, 0.62)}
    if with_rm:
        policies["bon"] = policy(gold_sft + 0.05, 12.0, 0.8, 0.6362943611198907)
        wins["bon_vs_sft"] = summary(bon_win, bon_win - 0.05, bon_win + 0.05)
        wins["ppo_vs_bon"] = summary(vs_bon, vs_bon - 0.05, vs_bon + 0.05)
    policies["ppo"] = policy(gold, 13.0, 0.7 if with_rm else None, kl)
    points = [{"update": 0, "kl": 0.0, "gold": gold_sft, "rm": None, "policy": "sft",
               "method": "sft"},
              {"update": 2, "kl": kl / 2, "gold": (gold_sft + gold) / 2, "rm": None,
               "policy": "snapshot", "method": "ppo"},
              {"update": 4, "kl": kl, "gold": gold, "rm": None, "policy": "ppo",
               "method": "ppo"}]
    if dpo_win is not None:
        (run / "dpo").mkdir()
        atomic_write_json(run / "dpo" / "manifest.json", {
            "stage": "dpo", "status": "complete",
            "metrics": {"train_seconds": 1320.0, "wall_seconds": 1380.0}})
        policies["dpo"] = policy(0.46, 20.5, None, 12.0)
        # Written the other way round: compare reads it from either direction.
        wins["sft_vs_dpo"] = summary(1 - dpo_win, 1 - dpo_win - 0.05, 1 - dpo_win + 0.04)
        points.append({"update": 112, "kl": 12.0, "gold": 0.46, "rm": None, "policy": "dpo",
                       "method": "dpo"})
    atomic_write_json(run / "eval" / "results.json", {
        "run": name, "num_prompts": 300, "best_of_n": 4, "temperature": 0.7,
        "ppo_algorithm": ppo_algorithm({"extras": ppo_extras}), "policies": policies,
        "win_rates": wins, "overoptimization": points})
    atomic_write_json(run / "eval" / "manifest.json", {
        "stage": "eval", "status": "complete", "created": "2026-12-01T16:49:57+00:00",
        "git_sha": "e2b4cb6aec9869af", "extras": {"results": "results.json"}})
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    root = tmp_path / "runs"
    return [make_run(root, "gae-s0", 0, win=0.60, bon_win=0.62, vs_bon=0.45, dpo_win=0.58),
            make_run(root, "gae-s1", 1, win=0.70, gold=0.46, kl=2.0, bon_win=0.66, vs_bon=0.50),
            make_run(root, "rloo-s0", 0, estimator="rloo", k=4, win=0.55, kl=2.5),
            make_run(root, "grpo-s0", 0, estimator="grpo", k=4, win=0.52, bon_win=0.62,
                     vs_bon=0.40)]


def rows_by(doc: dict) -> dict[tuple[str, str], dict]:
    return {(r["run"], r["policy"]): r for r in doc["rows"]}


def test_each_row_comes_from_its_runs_files(runs, tmp_path) -> None:
    out = compare.run(runs, tmp_path / "out")
    doc = json.loads((out / "compare.json").read_text())
    rows = rows_by(doc)
    assert len(doc["rows"]) == 4 + 1 + 3  # PPO per run, DPO of gae-s0, 3 best-of-4
    gae = rows["gae-s1", "ppo"]
    assert (gae["seed"], gae["label"], gae["group"]) == (1, "PPO (gae)", "PPO (gae)")
    assert gae["win_vs_sft"] == 0.70 and gae["win_vs_sft_ci"] == pytest.approx([0.65, 0.75])
    assert gae["win_vs_bon"] == 0.50 and gae["win_vs_bon_ci"] == pytest.approx([0.45, 0.55])
    assert (gae["gold_sft"], gae["gold"], gae["kl"]) == (0.40, 0.46, 2.0)
    assert (gae["rm"], gae["length"], gae["num_prompts"]) == (0.7, 13.0, 300)
    assert gae["train_minutes"] == pytest.approx(100 / 60) and gae["s_per_update"] == 25.0
    # The eval's snapshots are the row's points, after the SFT origin.
    assert gae["sft_point"] == {"kl": 0.0, "gold": 0.40}
    assert [(p["update"], p["kl"]) for p in gae["points"]] == [(2, 1.0), (4, 2.0)]
    # An eval without a reward model: no best-of-N, no RM score; empty cells, no error.
    rloo = rows["rloo-s0", "ppo"]
    assert rloo["label"] == "PPO (rloo, k=4)" and rloo["win_vs_sft"] == 0.55
    assert rloo["win_vs_bon"] is None and rloo["rm"] is None
    assert ("rloo-s0", "bon") not in rows
    dpo = rows["gae-s0", "dpo"]
    assert dpo["win_vs_sft"] == pytest.approx(0.58)
    assert dpo["win_vs_sft_ci"] == pytest.approx([0.54, 0.63])
    assert dpo["train_minutes"] == 22.0 and dpo["s_per_update"] is None
    bon = rows["gae-s1", "bon"]
    assert (bon["label"], bon["win_vs_sft"], bon["win_vs_bon"]) == ("best-of-4", 0.66, None)
    assert bon["kl"] == pytest.approx(0.6363, abs=1e-4) and bon["train_minutes"] is None
    # PPO groups first (in the order given), then DPO, then best-of-N; by seed within each.
    assert [(r["group"], r["seed"]) for r in doc["rows"]][:5] == [
        ("PPO (gae)", 0), ("PPO (gae)", 1), ("PPO (rloo, k=4)", 0), ("PPO (grpo, k=4)", 0),
        ("DPO", 0)]
    assert [r["run"] for r in doc["runs"]] == ["gae-s0", "gae-s1", "rloo-s0", "grpo-s0"]

    table = (out / "compare.md").read_text()
    assert ("| gae-s1 | 1 | PPO (gae) | 0.700 [0.650, 0.750] | 0.500 [0.450, 0.550] | 0.400 | "
            "0.460 | 2.00 | 0.70 | 13.0 | 1.7 | 25.0 |") in table
    assert "| rloo-s0 | 0 | PPO (rloo, k=4) | 0.550 [0.500, 0.600] | — | 0.400 | " in table


def test_groups_mean_and_spread_over_seeds(runs, tmp_path) -> None:
    doc = json.loads((compare.run(runs, tmp_path / "out") / "compare.json").read_text())
    groups = {g["group"]: g for g in doc["groups"]}
    assert list(groups) == ["PPO (gae)", "PPO (rloo, k=4)", "PPO (grpo, k=4)", "DPO",
                            "best-of-4"]
    gae = groups["PPO (gae)"]
    assert gae["seeds"] == [0, 1] and gae["runs"] == 2
    assert gae["stats"]["win_vs_sft"] == pytest.approx({"mean": 0.65, "sd": 0.1 / 2 ** 0.5,
                                                        "n": 2})
    assert gae["stats"]["kl"]["mean"] == pytest.approx(2.5)
    # One seed: a mean without a spread.
    assert groups["PPO (rloo, k=4)"]["stats"]["win_vs_sft"] == {"mean": 0.55, "sd": None,
                                                                "n": 1}
    assert "win_vs_bon" not in groups["PPO (rloo, k=4)"]["stats"]
    # gae-s0 and grpo-s0 share seed 0's best-of-4: it counts once, (0.62 + 0.66) / 2.
    bon = groups["best-of-4"]
    assert bon["runs"] == 3 and bon["seeds"] == [0, 1]
    assert bon["stats"]["win_vs_sft"]["mean"] == pytest.approx(0.64)
    assert bon["stats"]["win_vs_sft"]["sd"] == pytest.approx(0.04 / 2 ** 0.5)
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| PPO (gae) | 2 | 0.650 ± 0.071 | 0.475 ± 0.035 | " in table
    assert "| PPO (rloo, k=4) | 1 | 0.550 | — | " in table


def test_group_by_policy_puts_the_estimators_together(runs, tmp_path) -> None:
    doc = compare.build(runs, "policy")
    groups = {g["group"]: g for g in doc["groups"]}
    assert list(groups) == ["PPO", "DPO", "best-of-4"]
    assert {r["label"] for r in doc["rows"] if r["group"] == "PPO"} == {
        "PPO (gae)", "PPO (rloo, k=4)", "PPO (grpo, k=4)"}
    # Seed 0: gae, rloo and grpo averaged (0.60, 0.55, 0.52); seed 1: gae's 0.70.
    ppo = groups["PPO"]["stats"]["win_vs_sft"]
    assert ppo["n"] == 2 and ppo["mean"] == pytest.approx((1.67 / 3 + 0.70) / 2)


def test_html_is_self_contained_with_the_two_plots(runs, tmp_path) -> None:
    page = (compare.run(runs, tmp_path / "out") / "compare.html").read_text()
    plots = re.findall(r'<img class="plot" data-plot="([^"]+)"[^>]* '
                       r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [name for name, _ in plots] == ["compare_gold_vs_kl", "compare_win_rate_vs_sft"]
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in plots)
    assert page.count("<img") == 2 and "http" not in page.replace("http-equiv", "")
    assert "<td>PPO (rloo, k=4)</td><td>0.550 [0.500, 0.600]</td>" in page


def test_a_run_without_a_complete_eval_is_refused_and_nothing_is_written(runs, tmp_path,
                                                                         capsys) -> None:
    bare = tmp_path / "runs" / "bare"
    (bare / "ppo").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["compare", *map(str, runs), str(bare), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: compare: {bare}: no complete eval stage (no eval/manifest.json; run "
                   "`rlhf eval` for it)")
    assert not out.exists()


def test_a_corrupt_results_file_is_named_in_one_line(runs, tmp_path) -> None:
    path = runs[1] / "eval" / "results.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(PipelineError) as exc:
        compare.run(runs, tmp_path / "out")
    assert str(exc.value).startswith(f"compare: {path}: not valid JSON (")
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()
    path.write_text(json.dumps({"policies": {}}))
    with pytest.raises(PipelineError, match=re.escape(f"{path}: no policies.sft.gold")):
        compare.run(runs, tmp_path / "out")
    results = json.loads((runs[0] / "eval" / "results.json").read_text())
    del results["win_rates"]["ppo_vs_sft"]["ci95"]
    path.write_text(json.dumps(results))
    with pytest.raises(PipelineError, match=re.escape(
            f"compare: {path}: not the shape the eval stage writes (KeyError: 'ci95')")):
        compare.run(runs, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_bad_run_in_one_line(runs, tmp_path) -> None:
    incomplete = runs[2] / "eval" / "manifest.json"
    incomplete.write_text(json.dumps({"stage": "eval", "status": "running"}))
    gone = tmp_path / "nowhere"
    with pytest.raises(PipelineError) as exc:
        compare.build([*runs, gone, runs[0]], "estimator")
    assert str(exc.value) == (
        f"compare: {runs[2]}: no complete eval stage (eval status 'running'; run `rlhf eval` "
        f"for it); {gone}: no such run folder; {runs[0]}: given twice")


def test_cli_writes_the_three_files_and_refuses_bad_arguments(runs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out),
                 "--group-by", "policy"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json",
                                                     "compare.md"]
    assert json.loads((out / "compare.json").read_text())["group_by"] == "policy"
    assert main(["compare", str(runs[0]), "--group-by", "seed"]) == 2
    assert main(["compare"]) == 2
    assert main(["compare", "--help"]) == 0
    out_text = capsys.readouterr()
    assert "expected estimator or policy" in out_text.err and "no RUN_DIR given" in out_text.err
    assert "usage: rlhf compare RUN_DIR [RUN_DIR ...] [--out DIR]" in out_text.out


def test_win_rate_from_either_direction() -> None:
    results = {"win_rates": {"ppo_vs_sft": {"mean": 0.6, "ci95": [0.55, 0.66]},
                             "sft_vs_dpo": {"mean": 0.3, "ci95": [0.25, 0.36]}}}
    assert compare.win(results, "ppo", "sft") == (0.6, [0.55, 0.66])
    mean, ci = compare.win(results, "dpo", "sft")
    assert mean == pytest.approx(0.7) and ci == pytest.approx([0.64, 0.75])
    assert compare.win(results, "bon", "sft") == (None, None)


def test_overoptimization_curves_split_the_origin_and_each_method() -> None:
    sft = {"update": 0, "kl": 0.0, "gold": 0.4, "policy": "sft"}
    old = [sft, {"update": 10, "kl": 1.0, "gold": 0.42, "policy": "snapshot"}]
    assert overoptimization_curves({"overoptimization": old}) == ([sft], {"ppo": [old[1]]})
    new = [{**sft, "method": "sft"}, {"update": 5, "kl": 2.0, "gold": 0.45, "method": "dpo"},
           {"update": 10, "kl": 1.0, "gold": 0.42, "method": "ppo"}]
    origin, curves = overoptimization_curves({"overoptimization": new})
    assert origin == [new[0]] and curves == {"dpo": [new[1]], "ppo": [new[2]]}
    assert overoptimization_curves({}) == ([], {})


def write_samples(run: Path, golds: dict[str, list[float]]) -> None:
    """eval/samples.jsonl as the eval stage writes it: per prompt, each policy's response and
    gold score; ``golds`` maps a policy to its gold on prompts 0, 1, ..."""
    n = len(next(iter(golds.values())))
    rows = [{"id": f"wn-eval-{i:05d}", "word": f"w{i}", "prompt": "Define ...", "reference": "r",
             "sft": {"response": "s", "gold": 0.4, "rm": 0.1},
             **{name: {"response": name, "gold": g[i], "rm": 0.5} for name, g in golds.items()}}
            for i in range(n)]
    (run / "eval" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_runs_of_one_seed_are_compared_head_to_head_per_prompt(runs, tmp_path) -> None:
    gae0, gae1, rloo0, grpo0 = runs
    write_samples(gae0, {"ppo": [0.5, 0.4, 0.3, 0.6], "dpo": [0.5, 0.5, 0.5, 0.5]})
    # One prompt fewer: the pair is read on the three both hold.
    write_samples(rloo0, {"ppo": [0.4, 0.4, 0.5]})
    write_samples(gae1, {"ppo": [0.9, 0.9, 0.9, 0.9]})  # seed 1: no partner
    # grpo-s0 has no samples.jsonl: seed 0 but not compared.
    doc = json.loads((compare.run(runs, tmp_path / "out") / "compare.json").read_text())
    [h] = doc["head_to_head"]
    assert (h["policy"], h["run"], h["versus"], h["seed"], h["num_prompts"]) == (
        "ppo", "gae-s0", "rloo-s0", 0, 3)
    # Per prompt: 0.5 > 0.4, 0.4 = 0.4, 0.3 < 0.5 -> 1, 1/2, 0; gold +0.1, 0, -0.2.
    assert h["win"] == pytest.approx(0.5)
    assert h["gold_diff"] == pytest.approx(-0.1 / 3)
    assert h["win_ci"][0] <= 0.5 <= h["win_ci"][1]
    assert h["gold_diff_ci"][0] < h["gold_diff"] < h["gold_diff_ci"][1]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| PPO | gae-s0 | rloo-s0 | 0 | 3 | 0.500 [" in table
    assert "<h2>Head to head</h2>" in (tmp_path / "out" / "compare.html").read_text()


def test_without_samples_there_is_no_head_to_head(runs, tmp_path) -> None:
    out = compare.run(runs, tmp_path / "out")
    assert json.loads((out / "compare.json").read_text())["head_to_head"] == []
    assert "Head to head" not in (out / "compare.md").read_text()
    assert "Head to head" not in (out / "compare.html").read_text()


def test_a_bad_samples_line_is_named_and_nothing_is_written(runs, tmp_path) -> None:
    write_samples(runs[0], {"ppo": [0.5, 0.4]})
    write_samples(runs[2], {"ppo": [0.4, 0.4]})
    path = runs[2] / "eval" / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + json.dumps({"id": "x", "ppo": {"response": "r"}}) + "\n")
    with pytest.raises(PipelineError) as exc:
        compare.run(runs, tmp_path / "out")
    assert str(exc.value) == (f"compare: {path}:2: expected a JSON object with an id and each "
                              "policy's gold score (KeyError: 'gold')")
    assert not (tmp_path / "out").exists()

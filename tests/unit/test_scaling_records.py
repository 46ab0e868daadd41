"""`rlhf scaling` without models: the overoptimization fits from an eval stage's results, the
record file, the checks of its settings."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.config import load_config
from stages import scaling


def eval_results(alpha=0.08, beta=0.03, n_snapshots=6, bon_n=8):
    """results.json as the eval stage writes it: PPO points on Gao et al.'s RL curve (gold =
    0.4 + d (alpha - beta ln d)) and a best-of-n curve on the best-of-n form."""
    points = [{"update": 0, "kl": 0.0, "gold": 0.4, "rm": 0.0, "policy": "sft", "method": "sft"}]
    for i in range(1, n_snapshots + 1):
        kl = 0.8 * i
        d = math.sqrt(kl)
        points.append({"update": 5 * i, "kl": kl, "gold": 0.4 + d * (alpha - beta * math.log(d)),
                       "rm": 0.2 * i, "policy": "snapshot" if i < n_snapshots else "ppo",
                       "method": "ppo"})
    curve = []
    for n in range(1, bon_n + 1):
        kl = math.log(n) - (n - 1) / n
        d = math.sqrt(kl)
        curve.append({"n": n, "kl": kl, "gold": 0.4 + d * (0.1 - 0.04 * d), "rm": 0.1 * n})
    return {"overoptimization": points, "best_of_n_curve": curve}


def test_overoptimization_fits_recover_the_forms_and_predict_the_later_points():
    records = scaling.overoptimization(eval_results(), early_fraction=0.5, level=0.95)
    rl, bon = records
    assert rl["id"] == "overoptimization.ppo" and bon["id"] == "overoptimization.bon"
    assert rl["kind"] == "holdout" and "nothing was predicted before" in rl["note"]
    assert rl["fit"]["params"]["alpha"] == pytest.approx(0.08, abs=1e-6)
    assert rl["fit"]["params"]["beta"] == pytest.approx(0.03, abs=1e-6)
    assert rl["peak"]["kl"] == pytest.approx(math.exp(2 * (0.08 / 0.03 - 1)), rel=1e-4)
    # Early: updates 5, 10, 15 (<= half of 30); the exact curve predicts 20, 25, 30 exactly.
    assert [p["update"] for p in rl["points"] if p["early"]] == [5, 10, 15]
    assert [q["update"] for q in rl["predictions"]] == [20, 25, 30]
    for q in rl["predictions"]:
        assert q["value"] == pytest.approx(q["measured"], abs=1e-9)
    assert bon["fit"]["params"]["beta"] == pytest.approx(0.04, abs=1e-6)
    assert bon["peak"]["kl"] == pytest.approx((0.1 / 0.08) ** 2, rel=1e-4)
    assert [p["n"] for p in bon["points"] if p["early"]] == [2, 3, 4]
    json.dumps(records, allow_nan=False)  # JSON as written: no nan or inf


def test_overoptimization_reports_what_it_cannot_fit():
    # Two snapshots: the early half holds one point, too few for two parameters; best-of-4
    # leaves n = 2 alone before its cutoff. Both say so instead of failing.
    results = eval_results(n_snapshots=3, bon_n=4)
    results["overoptimization"][1]["kl"] = -0.01  # an estimate below 0 near the start
    rl, bon = scaling.overoptimization(results, early_fraction=0.5, level=0.95)
    assert rl["dropped"] and rl["dropped"][0]["update"] == 5
    assert "need at least 3" in rl["early_error"] and "fit" not in rl
    assert "need at least 3" in bon["early_error"] and bon["fit"]["points"] == 3
    rows = scaling.summary([rl, bon])
    assert [r["id"] for r in rows] == ["overoptimization.ppo (early fit)",
                                       "overoptimization.bon (early fit)"]
    assert scaling.overoptimization({"overoptimization": []}, 0.5, 0.95) == []


def test_the_record_keeps_the_time_of_a_prediction_made_again(tmp_path):
    path = tmp_path / "scaling.json"
    first = scaling.Ledger(path, {"schema": scaling.SCHEMA})
    made = first.add("prediction", "sft.eval_loss", points=[{"x": 1, "y": 2.0, "reused": False}],
                     predicted={"value": 1.5, "low": math.nan})
    first.finish()
    on_disk = json.loads(path.read_text())
    assert on_disk["records"][0]["predicted"]["low"] is None  # nan is written as null
    again = scaling.Ledger(path, {"schema": scaling.SCHEMA})
    same = again.add("prediction", "sft.eval_loss", points=[{"x": 1, "y": 2.0, "reused": True}],
                     predicted={"value": 1.5, "low": math.nan})
    assert same["unix"] == made["unix"] and same["time"] == made["time"]
    # Until the command finishes, the earlier records stay in the file.
    assert json.loads(path.read_text())["earlier_records"]
    other = again.add("prediction", "rm.accuracy", points=[], predicted={"value": 0.6})
    assert other["unix"] > made["unix"]
    again.finish()
    assert "earlier_records" not in json.loads(path.read_text())


def test_settings_it_cannot_run_with_are_all_listed(monkeypatch):
    cfg = load_config(None, ["scaling.sft_fractions=[0.1, 0.2, 0.2]",
                             "scaling.rm_fractions=[0.5, 1.5, 0.25, 0.125]",
                             "scaling.target_accuracy=1.2", "rm.eval_size=0", "run.resume=true"])
    found = scaling.problems(cfg)
    assert len(found) == 5, found
    assert any(p.startswith("scaling.sft_fractions=") and "at least 4 distinct" in p
               for p in found)
    assert any("scaling.rm_fractions" in p and "got 1.5" in p for p in found)
    assert any(p.startswith("scaling.target_accuracy=1.2") for p in found)
    assert any(p.startswith("rm.eval_size=0") for p in found)
    assert scaling.problems(load_config(None, [])) == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "one process" in scaling.problems(load_config(None, []))[0]


def test_ppo_snapshots_are_made_dense_enough():
    cfg = load_config(None, ["ppo.num_updates=30", "ppo.snapshot_every=10",
                             "scaling.ppo_points=6"])
    assert scaling.ppo_snapshots(cfg).ppo.snapshot_every == 5
    assert cfg.ppo.snapshot_every == 10  # the config itself is not changed
    denser = load_config(None, ["ppo.num_updates=30", "ppo.snapshot_every=3"])
    assert scaling.ppo_snapshots(denser) is denser


def test_the_eval_it_runs_is_lean():
    cfg = load_config(None, ["eval.num_prompts=300", "eval.calibration_questions=100"])
    lean = scaling.lean_eval(cfg, processes=2)
    assert (lean.eval.num_prompts, lean.eval.calibration_questions) == (128, 0)
    assert not lean.eval.base and cfg.eval.base
    assert lean.eval.batch_size == 64  # each process's 64 prompts in one call
    wide = load_config(None, ["eval.batch_size=100"])
    assert scaling.lean_eval(wide, processes=2).eval.batch_size == 100
    assert cfg.eval.num_prompts == 300  # the config itself is not changed
    fewer = scaling.lean_eval(load_config(None, ["eval.num_prompts=40"]))
    assert fewer.eval.num_prompts == 40
    whole = load_config(None, ["scaling.eval_prompts=null", "eval.num_prompts=300"])
    assert scaling.lean_eval(whole) is whole


def test_help_lists_the_scaling_keys_first(capsys):
    from pipeline.cli import main

    assert main(["scaling", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rlhf scaling [--config FILE|NAME] [key=value ...]")
    keys = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")
            and not line.startswith("    ")]
    assert keys[0] == "scaling.sft_fractions" and "scaling.target_accuracy" in keys
    assert "rm.eval_size" in keys and "ppo.snapshot_every" in keys

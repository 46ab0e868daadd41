"""`rlhf seeds`: shared SFT, one chain per seed, skip what finished, one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import seeds
from pipeline.config import ConfigError, load_config
from pipeline.rundir import atomic_write_json


def fake_stage_runner(calls: list):
    """Stands in for the child process: records the call, writes what the stage would."""

    def run_stage(stage, config_file, overrides, log):
        opts = dict(o.split("=", 1) for o in overrides)
        calls.append((stage, opts))
        run_dir = Path(opts.get("run.root", "runs")) / opts["run.name"]
        out = run_dir / stage
        out.mkdir(parents=True, exist_ok=True)
        seed = int(opts.get("run.seed", 0))
        metrics = {}
        if stage == "rm":
            metrics = {"eval_accuracy_gold_after": 0.7 + seed / 100, "eval_accuracy_after": 0.68}
        if stage == "eval":
            pol = {name: {"gold": {"mean": g}, "length_mean": 10.0, "no_eos_frac": 0.0,
                          **({"kl": {"mean": k}} if k is not None else {})}
                   for name, g, k in (("sft", 0.40, None), ("ppo", 0.45 + seed / 100, 3.0),
                                      ("bon", 0.42, 0.636))}
            wins = {"ppo_vs_sft": {"mean": 0.6, "ci95": [0.55, 0.65]},
                    "ppo_vs_bon": {"mean": 0.55, "ci95": [0.5, 0.6]}}
            if (run_dir / "dpo").is_dir():
                pol["dpo"] = {"gold": {"mean": 0.43}, "length_mean": 9.0, "no_eos_frac": 0.0,
                              "kl": {"mean": 2.0 + seed}}
                wins.update({"dpo_vs_sft": {"mean": 0.58, "ci95": [0.52, 0.63]},
                             "dpo_vs_ppo": {"mean": 0.47, "ci95": [0.41, 0.52]}})
            atomic_write_json(out / "results.json", {"policies": pol, "win_rates": wins,
                                                     "num_prompts": 300})
        if stage == "report":
            (run_dir / "report.html").write_text("<html></html>")
        else:
            atomic_write_json(out / "manifest.json", {"status": "complete", "metrics": metrics})
        return 60.0

    return run_stage


def test_seeds_share_sft_run_each_chain_and_write_one_table(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(seeds, "_run_stage", fake_stage_runner(calls))
    overrides = [f"run.root={tmp_path}", "run.name=exp", "run.seeds=[3, 4]", "run.seeds[1]=5",
                 "run.threads=1"]
    cfg = load_config(None, overrides)
    seeds.run(cfg, None, overrides, echo=lambda _: None)

    assert [c[0] for c in calls].count("sft") == 1
    sft_dir = str(tmp_path / "exp" / "sft")
    for seed in (3, 5):
        chain = [(s, o) for s, o in calls if o.get("run.seed") == str(seed)]
        assert [s for s, _ in chain] == ["label", "rm", "ppo", "eval", "report"]
        for _, opts in chain:
            assert opts["run.name"] == f"exp-seed{seed}"
            assert all(opts[k] == sft_dir for k in seeds.SFT_KEYS)
            # The child runs one chain, not the sweep.
            assert not [k for k in opts if k.startswith("run.seeds")]
        assert (tmp_path / f"exp-seed{seed}" / "sft").resolve() == Path(sft_dir).resolve()
    rows = json.loads((tmp_path / "exp" / "seeds.json").read_text())
    assert [r["seed"] for r in rows] == [3, 5]
    assert rows[1]["gold_ppo"] == pytest.approx(0.50)
    assert rows[1]["rm_gold_accuracy"] == pytest.approx(0.75)
    assert rows[0]["kl_bon"] == pytest.approx(0.636) and rows[0]["minutes"] == 5.0
    assert {"seed", "win_rate", "ci_low", "ci_high", "gold_sft", "gold_ppo", "kl",
            "rm_gold_accuracy", "minutes"} <= set(rows[0])
    table = (tmp_path / "exp" / "seeds.md").read_text()
    assert table.count("\n") == 2 + 2 + 1 and "mean ± sd" in table
    assert "DPO" not in table and "rm + ppo minutes" not in table  # no dpo stage ran

    # Again: everything finished, so nothing reruns; the table comes back the same.
    calls.clear()
    seeds.run(cfg, None, overrides, echo=lambda _: None)
    assert calls == []
    assert json.loads((tmp_path / "exp" / "seeds.json").read_text()) == rows


def test_seeds_run_dpo_when_pipeline_stages_list_it(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(seeds, "_run_stage", fake_stage_runner(calls))
    overrides = [f"run.root={tmp_path}", "run.name=cmp", "run.seeds=[0, 1]", "run.threads=1",
                 "pipeline.stages=[sft, label, rm, ppo, dpo, eval, report]"]
    cfg = load_config(None, overrides)
    seeds.run(cfg, None, overrides, echo=lambda _: None)
    chain = [(s, o) for s, o in calls if o.get("run.seed") == "1"]
    assert [s for s, _ in chain] == ["label", "rm", "ppo", "dpo", "eval", "report"]
    assert chain[3][1]["dpo.sft"] == str(tmp_path / "cmp" / "sft")
    rows = json.loads((tmp_path / "cmp" / "seeds.json").read_text())
    assert rows[1]["kl_dpo"] == 3.0 and rows[1]["win_rate_dpo_vs_ppo"] == 0.47
    # 60 s per stage: rm + ppo = 2 minutes, dpo 1, the whole chain 6.
    assert (rows[0]["minutes_rm_ppo"], rows[0]["minutes_dpo"], rows[0]["minutes"]) == (2, 1, 6)
    header, _, first, _, mean = (tmp_path / "cmp" / "seeds.md").read_text().splitlines()
    for title in ("DPO vs SFT win rate", "DPO vs PPO win rate", "gold DPO", "KL DPO-SFT",
                  "rm + ppo minutes", "dpo minutes"):
        assert title in header, title
    assert "[0.520, 0.630]" in first and "2.50 ± 0.71" in mean  # KL DPO: 2 and 3


def test_a_failing_stage_is_one_error_naming_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(seeds.sys, "executable", "false")
    with pytest.raises(seeds.PipelineError, match=r"seeds: stage sft failed \(exit code 1\)"):
        seeds._run_stage("sft", None, [], tmp_path / "x.log")


def test_seed_list_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"run.seeds=\[1, 1\]: expected distinct seeds"):
        load_config(None, ["run.seeds=[1, 1]"])
    with pytest.raises(ConfigError, match="run.seed_jobs=0: expected > 0"):
        load_config(None, ["run.seed_jobs=0"])

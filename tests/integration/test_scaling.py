"""`rlhf scaling` on tiny models: the predictions are on disk before the full-size stages they
predict start, and scaling.json has the schema the report and the README read."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from stages import reward, scaling, sft
from tests.conftest import tiny_override_list

torch.set_num_threads(1)

WORDS = ("the", "a", "cat", "runs", "blue", "over", "quiet", "river", "stone", "idea", "light")


def toy_ranked(path: Path, n_prompts: int, seed: int = 0) -> Path:
    """K = 3 responses; gold prefers more "good"s, and the annotators' ranking swaps one
    adjacent pair of a fifth of the prompts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        goods = rng.sample([0, 1, 2], 3)
        responses = []
        for g in goods:
            words = [rng.choice(WORDS) for _ in range(5)]
            for _ in range(g):
                words.insert(rng.randrange(len(words) + 1), "good")
            responses.append(" ".join(words))
        ranks = [2 - g for g in goods]
        if rng.random() < 0.2:
            a, b = rng.sample(range(3), 2)
            ranks[a], ranks[b] = ranks[b], ranks[a]
        rows.append({"prompt": f"Say something about item {i}.", "responses": responses,
                     "ranks": ranks, "gold_scores": [float(g) for g in goods]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scaling_args(root: Path, data: Path, *extra: str) -> list[str]:
    return [*tiny_override_list(root, name="sc"), "sft.max_steps=16",
            f"rm.data={data}", "rm.eval_size=24", "rm.batch_size=4", "rm.lr=3e-3",
            "rm.epochs=2", "rm.warmup_ratio=0", "rm.max_seq_len=48", "rm.norm_samples=4",
            "rm.max_new_tokens=4", "rm.log_every=5", "eval.bootstrap=200",
            "scaling.overoptimization=false", *extra]


def test_scaling_predicts_before_the_full_stages_and_writes_the_schema(tmp_path, monkeypatch):
    data = toy_ranked(tmp_path / "toy.jsonl", 120)
    run_dir = tmp_path / "runs" / "sc"
    seen = {}

    def watching(module, stage):
        original = module.run

        def run(cfg):
            if cfg.run_dir == run_dir:  # the full-size stage, not a small run
                doc = json.loads((run_dir / "scaling.json").read_text())
                seen[stage] = [r["id"] for r in doc["records"] if r["kind"] == "prediction"]
            return original(cfg)

        monkeypatch.setattr(module, "run", run)

    watching(sft, "sft")
    watching(reward, "rm")
    assert main(["scaling", *scaling_args(tmp_path / "runs", data)]) == 0
    torch.set_num_threads(1)

    # When each full-size stage started, its predictions were already in the file.
    assert seen["sft"] == ["sft.eval_loss"]
    assert seen["rm"] == ["sft.eval_loss", "rm.heldout_loss", "rm.accuracy", "rm.accuracy_gold"]
    doc = json.loads((run_dir / "scaling.json").read_text())
    assert doc["schema"] == scaling.SCHEMA and doc["run"] == "sc"
    assert set(doc) >= {"created", "git_sha", "scaling", "intervals", "records", "summary",
                        "seconds"} and "earlier_records" not in doc
    kinds = [(r["kind"], r["id"]) for r in doc["records"]]
    assert kinds == [("prediction", "sft.eval_loss"), ("measurement", "sft.eval_loss"),
                     ("prediction", "rm.heldout_loss"), ("prediction", "rm.accuracy"),
                     ("prediction", "rm.accuracy_gold"), ("measurement", "rm.heldout_loss"),
                     ("measurement", "rm.accuracy"), ("measurement", "rm.accuracy_gold")]
    predictions = {r["id"]: r for r in doc["records"] if r["kind"] == "prediction"}
    for m in (r for r in doc["records"] if r["kind"] == "measurement"):
        p = predictions[m["id"]]
        assert p["unix"] < m["stage_started_unix"] and m["prediction_first"] is True
        assert m["reused"] is False and m["x"] == p["predicted"]["x"]
        pred = p["predicted"]
        assert pred["low"] <= pred["curve_low"] <= pred["value"] <= pred["curve_high"] <= pred[
            "high"]
        assert m["within_interval"] == (pred["low"] <= m["value"] <= pred["high"])
        assert set(p["fit"]) >= {"form", "params", "stderr", "cov", "dof", "residual_std"}
        assert len(p["curve"]) == scaling.CURVE_POINTS

    sft_pred = predictions["sft.eval_loss"]
    assert [q["x"] for q in sft_pred["points"]] == [1, 2, 4, 6, 8]  # fractions of 16 steps
    assert sft_pred["predicted"]["x"] == 16 and sft_pred["fit"]["form"] == "a*x^b + c"
    for q in sft_pred["points"]:
        assert json.loads((Path(q["run"]) / "manifest.json").read_text())["status"] == "complete"
        assert Path(q["run"]).parent.parent == run_dir / "scaling"

    # Nested subsets (1/32 to 1/4) of the 96 training prompts; every reward model scored on
    # the full one's 24 held-out prompts, which are the full stage's own held-out split.
    rm_pred = predictions["rm.accuracy"]
    assert [q["prompts"] for q in rm_pred["points"]] == [3, 6, 12, 24]
    subsets = [(Path(q["run"]).parent / "data.jsonl").read_text().splitlines()
               for q in rm_pred["points"]]
    assert all(big[: len(small)] == small for small, big in zip(subsets, subsets[1:]))
    assert rm_pred["x_name"] == "training comparisons" and rm_pred["fit"]["form"].startswith(
        "alpha")
    target = rm_pred["target"]
    assert set(target) == {"target", "x", "low", "high", "x_max"} and target["target"] == 0.7
    measured = {r["id"]: r for r in doc["records"] if r["kind"] == "measurement"}
    for key in ("rm.accuracy", "rm.accuracy_gold"):
        assert measured[key]["value"] == pytest.approx(measured[key]["stage_reported"])
        assert measured[key]["low"] <= measured[key]["value"] <= measured[key]["high"]
    assert measured["rm.heldout_loss"]["value"] > 0

    assert [r["id"] for r in doc["summary"]] == ["sft.eval_loss", "rm.heldout_loss",
                                                 "rm.accuracy", "rm.accuracy_gold"]
    html = (run_dir / "report.html").read_text()
    assert 'id="scaling"' in html
    for name in ("sft_eval_loss", "rm_heldout_loss", "rm_accuracy", "rm_accuracy_gold"):
        assert f'data-plot="scaling_{name}"' in html

    # Again: every stage is reused and the predictions keep the times that precede them.
    assert main(["scaling", *scaling_args(tmp_path / "runs", data)]) == 0
    torch.set_num_threads(1)
    again = json.loads((run_dir / "scaling.json").read_text())
    assert [r["unix"] for r in again["records"] if r["kind"] == "prediction"] == [
        r["unix"] for r in doc["records"] if r["kind"] == "prediction"]
    assert all(r["reused"] and r["prediction_first"] for r in again["records"]
               if r["kind"] == "measurement")


def test_small_runs_side_by_side_match_the_same_runs_in_turn(tmp_path):
    """scaling.jobs=2 trains the small runs in two child processes (one thread each here, as
    the in-turn runs): the same points, each run's output in its own log."""
    data = toy_ranked(tmp_path / "toy.jsonl", 60)
    points = {}
    for jobs in (1, 2):
        root = tmp_path / f"jobs{jobs}"
        assert main(["scaling", *scaling_args(root, data, f"scaling.jobs={jobs}")]) == 0
        torch.set_num_threads(1)
        doc = json.loads((root / "sc" / "scaling.json").read_text())
        points[jobs] = {r["id"]: [(q["x"], q["y"]) for q in r["points"]]
                        for r in doc["records"] if r["kind"] == "prediction"}
        logs = sorted(p.name for p in (root / "sc" / "scaling").glob("*/*.log"))
        assert logs == ([] if jobs == 1 else ["rm.log"] * 4 + ["sft.log"] * 5)
    assert set(points[1]) == {"sft.eval_loss", "rm.heldout_loss", "rm.accuracy",
                              "rm.accuracy_gold"}
    assert points[2] == points[1]
    assert scaling.job_threads(scaling.with_keys(scaling.Config(), {"run.threads": 2}), 2) == 1
    assert scaling.job_threads(scaling.with_keys(scaling.Config(), {"run.threads": 1}), 2) == 1
    assert scaling.job_threads(scaling.with_keys(scaling.Config(), {"run.threads": 8}), 3) == 2


def test_scaling_refuses_bad_settings_with_exit_2(tmp_path, capsys):
    data = toy_ranked(tmp_path / "toy.jsonl", 30)
    args = scaling_args(tmp_path / "runs", data, "scaling.sft_fractions=[0.5]",
                        "scaling.level=2")
    assert main(["scaling", *args]) == 2
    err = capsys.readouterr().err
    assert "scaling.sft_fractions=[0.5]" in err and "scaling.level=2" in err
    assert not (tmp_path / "runs" / "sc").exists()


@pytest.mark.slow
def test_scaling_through_label_ppo_and_eval(tmp_path):
    """The whole command as `make scaling` runs it, on tiny models: the label stage ranks
    samples of the SFT policy, PPO saves its snapshots, eval measures best-of-n for each n."""
    args = [*tiny_override_list(tmp_path / "runs", name="full"), "sft.max_steps=16",
            "label.num_prompts=60", "label.k=4", "label.max_new_tokens=8", "label.batch_size=30",
            "rm.eval_size=12", "rm.batch_size=4", "rm.lr=3e-3", "rm.max_seq_len=64",
            "rm.norm_samples=4", "rm.max_new_tokens=4", "ppo.num_updates=6", "ppo.batch_size=4",
            "ppo.num_minibatches=1", "ppo.ppo_epochs=1", "ppo.response_length=8",
            "ppo.gold_judge=", "ppo.num_prompts=16", "eval.num_prompts=6",
            "eval.max_new_tokens=8", "eval.batch_size=6", "eval.bootstrap=100",
            "eval.best_of_n=8", "eval.calibration_questions=2", "scaling.ppo_points=6"]
    assert main(["scaling", *args]) == 0
    torch.set_num_threads(1)
    run_dir = tmp_path / "runs" / "full"
    doc = json.loads((run_dir / "scaling.json").read_text())
    holdouts = {r["id"]: r for r in doc["records"] if r["kind"] == "holdout"}
    assert set(holdouts) == {"overoptimization.ppo", "overoptimization.bon"}
    ppo_points = holdouts["overoptimization.ppo"]["points"] + holdouts["overoptimization.ppo"][
        "dropped"]
    assert sorted(p["update"] for p in ppo_points) == [1, 2, 3, 4, 5, 6]
    assert sorted(p["n"] for p in holdouts["overoptimization.bon"]["points"]) == list(
        range(2, 9))
    for r in holdouts.values():
        assert "fit" in r or "error" in r
        assert "early_fit" in r or "early_error" in r
    assert (run_dir / "label" / "data.jsonl").is_file()
    # scaling.jobs=2 on a CPU: the sampling stages ran sharded across two processes.
    assert json.loads((run_dir / "label" / "manifest.json").read_text())["metrics"][
        "world_size"] == 2
    assert json.loads((run_dir / "eval" / "manifest.json").read_text())["extras"][
        "world_size"] == 2
    html = (run_dir / "report.html").read_text()
    assert 'data-plot="scaling_overoptimization_ppo"' in html
    assert 'data-plot="scaling_overoptimization_bon"' in html

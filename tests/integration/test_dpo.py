"""The DPO stage on a tiny SFT model: learning a toy preference, the handoff to eval and report,
refusals in one line, and resume from the Trainer's checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.rundir import MANIFEST, atomic_write_json, read_manifest
from stages import dpo, evaluate, ppo, report, sft
from tests.conftest import tiny_override_list
from tests.faults.helpers import (
    cli,
    error_line,
    fingerprint,
    incomplete,
    kill_after_checkpoint,
    same_weights,
)
from tests.integration.test_reward import toy_rows, write_jsonl

torch.set_num_threads(1)

DPO = ["dpo.eval_size=16", "dpo.batch_size=8", "dpo.max_seq_len=64", "dpo.warmup_ratio=0",
       "dpo.lr_scheduler=constant", "dpo.log_every=1", "dpo.num_samples=2",
       "dpo.max_new_tokens=8"]
EVAL = ["eval.num_prompts=6", "eval.max_new_tokens=8", "eval.batch_size=6", "eval.bootstrap=50",
        "eval.calibration_questions=2"]


def args(root: Path, name: str, *extra: str) -> list[str]:
    return [*tiny_override_list(root, name), *DPO, *EVAL, *extra]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dpo_runs")
    path = sft.run(load_config(None, tiny_override_list(root, "base")))
    torch.set_num_threads(1)
    return path


@pytest.fixture(scope="module")
def toy_data(sft_dir: Path) -> Path:
    return write_jsonl(sft_dir.parents[1] / "toy.jsonl", toy_rows(80))


@pytest.fixture(scope="module")
def toy_dpo(sft_dir: Path, toy_data: Path) -> Path:
    """Full fine-tuning, best-vs-worst pairs, with one snapshot for the overoptimization view."""
    cfg = load_config(None, args(sft_dir.parents[1], "toy", f"dpo.sft={sft_dir}",
                                 f"dpo.data={toy_data}", "dpo.max_steps=16", "dpo.lr=3e-3",
                                 "dpo.snapshot_every=8"))
    path = dpo.run(cfg)
    torch.set_num_threads(1)
    return path


def test_learns_the_toy_preference_and_changes_the_weights(sft_dir: Path, toy_data: Path,
                                                           toy_dpo: Path):
    manifest = read_manifest(toy_dpo)
    m = manifest["metrics"]
    # Before training the policy is its own reference: zero implicit reward, loss log 2.
    assert m["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-5)
    # After: the held-out chosen responses gained log-probability over the rejected ones.
    assert m["eval_logp_margin_after"] > m["eval_logp_margin_before"] + 1.0, m
    assert m["eval_reward_margin_after"] > 0.1
    assert m["eval_accuracy_after"] >= 0.8
    assert m["eval_loss_after"] < math.log(2) - 0.05
    # 80 toy prompts, 16 held out, one best-vs-worst pair each (K=3, distinct ranks).
    assert (m["train_pairs"], m["eval_pairs"], m["steps"]) == (64, 16, 16)
    assert manifest["stage"] == "dpo" and manifest["status"] == "complete"
    assert set(manifest["parents"]) == {"sft"}  # explicit data: no label stage
    assert manifest["extras"]["pairs"] == "best_worst" and not manifest["extras"]["lora"]
    assert manifest["tokenizer_sha256"] == read_manifest(sft_dir)["tokenizer_sha256"]

    trained = load_file(str(toy_dpo / "model" / "model.safetensors"))
    base = load_file(str(sft_dir / "model" / "model.safetensors"))
    assert trained.keys() == base.keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert not torch.allclose(trained[name], base[name]), name
    assert not list((toy_dpo / "model").glob("*.bin")) and not list(toy_dpo.rglob("*.pkl"))
    card = (toy_dpo / "model" / "README.md").read_text()
    assert "trained with DPO" in card and f"- **Data (ranked responses):** {toy_data}" in card

    rows = [json.loads(line) for line in (toy_dpo / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert {"train/rewards/margins", "train/logps/chosen", "train/lr",
            "train/grad_norm"} <= set(train[0])
    evals = [r["step"] for r in rows if "eval/loss" in r]
    assert evals == [0, 16]
    samples = (toy_dpo / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "response" in json.loads(samples[0])
    assert [p.name for p in (toy_dpo / "snapshots").iterdir()] == ["step-000008"]
    assert not (toy_dpo / "checkpoints").exists()  # save_every=0


def test_lora_all_pairs_from_the_label_stage(sft_dir: Path):
    """Data found through the run's label stage (a parent in the manifest); every ordered pair
    of each ranking; LoRA leaves the embeddings alone and trains the adapted projections."""
    root = sft_dir.parents[1]
    label = root / "lora" / "label"
    label.mkdir(parents=True)
    rows = toy_rows(30, seed=2)
    rows[0]["ranks"] = [0, 0, 1]  # a tie: two pairs, not three
    write_jsonl(label / "data.jsonl", rows)
    atomic_write_json(label / MANIFEST, read_manifest(sft_dir) | {"stage": "label"})
    cfg = load_config(None, args(root, "lora", f"dpo.sft={sft_dir}", "dpo.pairs=all",
                                 "dpo.eval_size=4", "dpo.max_steps=3", "dpo.lr=1e-2",
                                 "dpo.lora.enabled=true", "dpo.lora.r=4", "dpo.lora.alpha=8",
                                 "dpo.num_samples=0", "dpo.snapshot_every=2"))
    path = dpo.run(cfg)
    torch.set_num_threads(1)
    manifest = read_manifest(path)
    m = manifest["metrics"]
    assert m["train_pairs"] + m["eval_pairs"] == 29 * 3 + 2
    assert set(manifest["parents"]) == {"sft", "label"}
    assert manifest["parents"]["label"]["path"] == str(label)
    assert manifest["extras"]["lora"] and manifest["extras"]["pairs"] == "all"
    assert m["trainable_params"] < m["total_params"] / 4
    trained = load_file(str(path / "model" / "model.safetensors"))
    base = load_file(str(sft_dir / "model" / "model.safetensors"))
    assert trained.keys() == base.keys()  # merged: a plain model, no adapter left
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.allclose(trained["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"])
    # The snapshot is a merged plain model too, between the SFT and the final weights.
    snapshot = load_file(str(path / "snapshots" / "step-000002" / "model.safetensors"))
    assert snapshot.keys() == base.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(snapshot[q], base[q]) and not torch.equal(snapshot[q], trained[q])


def test_bad_inputs_are_one_line_and_leave_nothing_complete(sft_dir: Path, toy_data: Path,
                                                            tmp_path, capsys):
    root = tmp_path / "runs"
    bad = write_jsonl(tmp_path / "bad.jsonl", toy_rows(3))
    with open(bad, "a") as f:
        f.write('{"prompt": "p", "responses": ["a", "b"], "ranks": [0]}\n')
    code, _, err = cli(capsys, "dpo", *args(root, "bad", f"dpo.sft={sft_dir}",
                                            f"dpo.data={bad}"))
    assert code == 1
    error_line(err, rf"{bad}:4: .*ranks")
    assert incomplete(root / "bad" / "dpo")

    code, _, err = cli(capsys, "dpo", *args(root, "bad", f"dpo.sft={sft_dir.parent}",
                                            f"dpo.data={bad}"))
    assert code == 1
    error_line(err, r"dpo\.sft: .* has no manifest\.json")

    tied = write_jsonl(tmp_path / "tied.jsonl",
                       [{"prompt": f"p{i}", "responses": ["a", "b"], "ranks": [0, 0]}
                        for i in range(4)])
    code, _, err = cli(capsys, "dpo", *args(root, "bad", f"dpo.sft={sft_dir}",
                                            f"dpo.data={tied}", "dpo.eval_size=1"))
    assert code == 1
    error_line(err, rf"{tied}:1: .*no preference")
    assert incomplete(root / "bad" / "dpo")

    code, _, err = cli(capsys, "dpo", *args(root, "nan", f"dpo.sft={sft_dir}",
                                            f"dpo.data={toy_data}", "dpo.lr=1e8",
                                            "dpo.max_steps=6", "dpo.num_samples=0"))
    assert code == 1
    error_line(err, r"dpo: stopped at step [2-6]: (train loss|gradient norm) is nan, .*"
                    "no checkpoint was saved before it")
    assert incomplete(root / "nan" / "dpo")

    code, _, err = cli(capsys, "dpo", *args(root, "bad", "dpo.pairs=some",
                                            "dpo.max_seq_len=16"))
    assert code == 2
    assert "dpo.pairs='some'" in err and "dpo.max_seq_len=16" in err


def test_a_bad_input_over_the_finished_stage_leaves_it_intact(sft_dir: Path, toy_data: Path,
                                                              toy_dpo: Path, capsys):
    """Refused in the stage's check, before run.overwrite clears anything."""
    before = fingerprint(toy_dpo)
    code, _, err = cli(capsys, "dpo", *args(sft_dir.parents[1], "toy", f"dpo.sft={sft_dir}",
                                            f"dpo.data={toy_data}", "dpo.eval_size=80",
                                            "run.overwrite=true"))
    assert code == 1
    error_line(err, rf"^error: dpo\.eval_size=80 leaves no training prompts: {toy_data} has "
                    "80 ranked prompts")
    assert fingerprint(toy_dpo) == before and not incomplete(toy_dpo)


def test_eval_and_report_take_the_dpo_policy_beside_ppo(sft_dir: Path, toy_dpo: Path):
    """The same run holds a (rule-only, 2-update) PPO stage from the same SFT policy: eval
    measures both, pairs them, and draws one overoptimization curve for each."""
    cfg = load_config(None, args(sft_dir.parents[1], "toy", f"eval.sft={sft_dir}",
                                 "eval.best_of_n=0", f"ppo.policy={sft_dir}", "ppo.gold_judge=",
                                 "ppo.num_updates=2", "ppo.batch_size=4", "ppo.ppo_epochs=1",
                                 "ppo.response_length=8", "ppo.num_prompts=8",
                                 "ppo.snapshot_every=1",
                                 "ppo.rewards=[{type: rule, name: no_headword}]"))
    ppo.run(cfg)
    torch.set_num_threads(1)
    results = json.loads((evaluate.run(cfg) / "results.json").read_text())
    torch.set_num_threads(1)
    assert set(results["policies"]) == {"base", "sft", "ppo", "dpo"}
    row = results["policies"]["dpo"]
    assert row["kl"]["reference"] == "sft" and row["gold"]["n"] == 6
    assert {"length_mean", "no_eos_frac", "headword_violation_frac", "length_violation_frac",
            "cost_mean"} <= set(row)
    assert set(results["win_rates"]) == {"ppo_vs_sft", "sft_vs_base", "ppo_vs_base",
                                         "dpo_vs_sft", "dpo_vs_ppo"}
    points = results["overoptimization"]
    assert [(p["method"], p["policy"], p["update"]) for p in points] == [
        ("sft", "sft", 0), ("ppo", "snapshot", 1), ("ppo", "ppo", 2), ("dpo", "snapshot", 8),
        ("dpo", "dpo", 16)]
    assert points[-1]["kl"] == pytest.approx(row["kl"]["mean"])
    eval_manifest = read_manifest(sft_dir.parents[1] / "toy" / "eval")
    assert eval_manifest["parents"]["dpo"]["path"] == str(toy_dpo)
    assert eval_manifest["metrics"]["win_rate_dpo_vs_sft"] == results["win_rates"][
        "dpo_vs_sft"]["mean"]
    samples = json.loads((sft_dir.parents[1] / "toy" / "eval" / "samples.jsonl")
                         .read_text().splitlines()[0])
    assert "gold" in samples["dpo"]

    page = (report.run(cfg) / report.REPORT).read_text()
    assert "<td>dpo</td>" in page and "<td>ppo</td>" in page
    assert 'data-plot="overoptimization"' in page
    # The heading names the policies evaluated; DPO's curves and samples come as PPO's do.
    assert '<h2 id="eval">Evaluation: base vs SFT vs PPO vs DPO</h2>' in page
    assert '<h2 id="dpo">DPO</h2>' in page and 'data-plot="dpo_training"' in page
    assert page.count('<tr data-policy="dpo">') == page.count('<tr data-policy="ppo">') > 0
    assert "held-out pair accuracy" in page  # dpo's line in the lineage table
    # Without a dpo stage there is no DPO section.
    assert '<h2 id="dpo">' not in report.build(sft_dir.parent)


def test_resume_from_a_trainer_checkpoint_is_exact(sft_dir: Path, toy_data: Path, tmp_path,
                                                   capsys):
    root = tmp_path / "runs"
    common = [f"dpo.sft={sft_dir}", f"dpo.data={toy_data}", "dpo.max_steps=4",
              "dpo.save_every=2", "dpo.lr=3e-3", "dpo.num_samples=0"]
    old_umask = os.umask(0o022)
    try:
        code, _, err = cli(capsys, "dpo", *args(root, "r", *common, "tracking.progress=true"))
    finally:
        os.umask(old_umask)
    assert code == 0, err
    # stderr is not a terminal: one line per logging interval (dpo.log_every=1).
    pattern = r"\[dpo\] step (\d)/4  loss \S+  accuracy \S+  margin \S+  (eta|took) \S+"
    lines = [line for line in err.splitlines() if line.startswith("[dpo]")]
    assert [int(re.fullmatch(pattern, line).group(1)) for line in lines] == [1, 2, 3, 4], err
    assert "took" in lines[-1]
    stage = root / "r" / "dpo"
    shutil.copytree(stage / "model", tmp_path / "straight")
    straight = read_manifest(stage)["metrics"]
    assert (stage / "checkpoints" / "latest").read_text().strip() == "checkpoint-2"
    assert not (stage / "checkpoints" / "checkpoint-4").exists()  # none at the last step
    kept = stage / "checkpoints" / "checkpoint-2"
    assert json.loads((kept / "state.json").read_text())["step"] == 2
    assert not list(kept.glob("*.bin")) and (kept / "model.safetensors").is_file()
    assert (kept / "config.yaml").is_file()
    # Its model/ opens with plain from_pretrained, and the Trainer's files follow the umask.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(kept / "model").config.hidden_size == 32
    assert {p.stat().st_mode & 0o777 for p in kept.rglob("*") if p.is_file()} == {0o644}

    kill_after_checkpoint(stage)
    code, out, err = cli(capsys, "status", root / "r")
    assert "resumable from checkpoint-2" in out
    code, _, err = cli(capsys, "dpo", *args(root, "r", *common, "dpo.beta=0.5",
                                            "run.resume=true"))
    assert code == 1
    error_line(err, r"dpo\.beta: 0\.1 -> 0\.5")
    code, _, err = cli(capsys, "dpo", *args(root, "r", *common, "run.resume=true"))
    assert code == 0, err
    same_weights(stage / "model", tmp_path / "straight")
    resumed = read_manifest(stage)["metrics"]
    for key in ("eval_loss_after", "eval_logp_margin_after", "eval_loss_before", "steps"):
        assert resumed[key] == straight[key], key
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]


def test_pipeline_runs_the_stages_pipeline_stages_lists(sft_dir: Path, toy_data: Path, tmp_path,
                                                       capsys):
    root = tmp_path / "runs"
    code, out, err = cli(capsys, "pipeline", *args(root, "p", f"dpo.sft={sft_dir}",
                                                   f"dpo.data={toy_data}", "dpo.max_steps=1",
                                                   "dpo.eval_size=4", "dpo.num_samples=0",
                                                   "pipeline.stages=[dpo, report]"))
    assert code == 0, err
    assert "[dpo] complete" in out and "[report] written" in out
    assert sorted(p.name for p in (root / "p").iterdir()) == ["dpo", "report.html"]
    page = (root / "p" / "report.html").read_text()
    assert "<td>dpo</td>" in page  # the lineage table lists the stage


def test_two_process_ddp_splits_the_pairs(sft_dir: Path, toy_data: Path, tmp_path):
    """Under 2 gloo processes each takes half the pairs: an epoch of 64 pairs at 4 per process
    is 8 steps, as the stage counts its budget; only rank 0 writes."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(repo / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "pipeline.cli"]
    root = tmp_path / "runs"
    proc = subprocess.run([*launch, "dpo", *args(root, "ddp", f"dpo.sft={sft_dir}",
                                                f"dpo.data={toy_data}", "dpo.epochs=1",
                                                "dpo.batch_size=4", "dpo.num_samples=0")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = root / "ddp" / "dpo"
    m = read_manifest(stage)["metrics"]
    assert (m["world_size"], m["train_pairs"], m["steps"]) == (2, 64, 8)
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))

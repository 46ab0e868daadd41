"""PPO on a tiny random model: it follows a reward, respects the KL leash, resumes exactly,
and runs in LoRA, Lagrangian and 2-process modes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.rundir import MANIFEST
from stages import ppo, sft
from tests.conftest import tiny_override_list

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
RULE = "tests.integration.ppo_rules:brevity"
PPO = [
    "ppo.batch_size=16", "ppo.num_minibatches=2", "ppo.ppo_epochs=2", "ppo.response_length=16",
    "ppo.gold_judge=", "ppo.sample_every=0", "ppo.num_prompts=64", "ppo.lr=3e-3",
    "ppo.critic_lr=3e-3", f"ppo.rewards=[{{type: rule, name: '{RULE}'}}]",
]
# A few SFT steps teach the random model to end responses with EOS, which brevity then rewards.
SFT = ["sft.max_steps=20", "sft.lr=1e-2", "sft.train_size=320", "sft.batch_size=16",
       "sft.num_samples=0"]


def overrides(root: Path, *extra: str) -> list[str]:
    return [*tiny_override_list(root, "t"), *SFT, *PPO, *extra]


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ppo")
    sft.run(load_config(None, overrides(root)))
    return root


def run_ppo(root: Path, *extra: str) -> tuple[dict, list[dict]]:
    path = ppo.run(load_config(None, overrides(root, *extra)))
    manifest = json.loads((path / MANIFEST).read_text())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return manifest, rows


def mean(rows: list[dict], key: str, sl: slice) -> float:
    values = [r[key] for r in rows[sl]]
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def learning_run(sft_root) -> tuple[dict, list[dict]]:
    return run_ppo(sft_root, "ppo.num_updates=20", "ppo.kl_coef=0.01", "run.overwrite=true")


def test_ppo_raises_reward_and_keeps_kl_finite(sft_root, learning_run):
    manifest, rows = learning_run
    key = "reward/rule/brevity"
    start, end = mean(rows, key, slice(0, 3)), mean(rows, key, slice(-3, None))
    assert end > start + 0.25, (start, end)
    assert all(math.isfinite(r["objective/kl"]) for r in rows)
    assert manifest["status"] == "complete"
    assert manifest["metrics"]["updates"] == 20
    assert manifest["parents"]["policy"]["path"] == str(sft_root / "t" / "sft")


def test_large_beta_keeps_policy_near_reference(sft_root, learning_run):
    _, loose = learning_run
    _, tight = run_ppo(sft_root, "ppo.num_updates=20", "ppo.kl_coef=2.0", "run.name=tight",
                       f"ppo.policy={sft_root / 't' / 'sft'}")
    kl_loose = mean(loose, "objective/kl", slice(-5, None))
    kl_tight = mean(tight, "objective/kl", slice(-5, None))
    assert kl_tight < kl_loose / 3, (kl_tight, kl_loose)


def test_logged_metrics_cover_the_checklist(learning_run):
    _, rows = learning_run
    for key in ("objective/kl", "objective/rlhf_reward", "objective/scores",
                "objective/non_score_reward", "policy/approxkl", "policy/clipfrac",
                "policy/entropy", "policy/ratio", "val/clipfrac", "val/error", "loss/policy",
                "loss/value", "response/length", "response/no_eos_fraction", "lr/policy",
                "time/generate", "time/score", "time/train", "perf/tokens_per_s"):
        assert key in rows[-1], key
    # Policy and reference are the same network before the first update.
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)


def test_resume_matches_uninterrupted_run(sft_root):
    policy = f"ppo.policy={sft_root / 't' / 'sft'}"
    args = ("ppo.num_updates=4", "ppo.save_every=2", "ppo.batch_size=8", "run.name=resume",
            policy)
    _, full = run_ppo(sft_root, *args)
    stage = sft_root / "resume" / "ppo"
    full_weights = load_file(str(stage / "model" / "model.safetensors"))
    # Simulate a kill after the update-2 checkpoint: no manifest, no final model.
    (stage / MANIFEST).unlink()
    shutil.rmtree(stage / "model")
    assert (stage / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    _, resumed = run_ppo(sft_root, *args, "run.resume=true")
    resumed_weights = load_file(str(stage / "model" / "model.safetensors"))
    for k in full_weights:
        assert torch.allclose(full_weights[k], resumed_weights[k], atol=1e-6), k
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["objective/kl"] == pytest.approx(full[-1]["objective/kl"], abs=1e-6)


def test_resume_without_checkpoint_is_refused(sft_root):
    with pytest.raises(PipelineError, match="no checkpoint"):
        run_ppo(sft_root, "ppo.num_updates=1", "run.name=nockpt", "run.resume=true",
                f"ppo.policy={sft_root / 't' / 'sft'}")


def test_missing_reward_model_parent_is_refused(sft_root):
    with pytest.raises(PipelineError, match="ppo.reward_model"):
        run_ppo(sft_root, "ppo.num_updates=1", "run.name=normodel", "ppo.rewards=[{type: model}]",
                f"ppo.policy={sft_root / 't' / 'sft'}")


def test_lora_mode_and_lagrangian_cost(sft_root):
    # Brevity's values are <= 0, so as a cost its mean sits above a threshold of -1 and the
    # multiplier has to grow.
    manifest, rows = run_ppo(
        sft_root, "ppo.num_updates=3", "ppo.batch_size=8", "ppo.lora.enabled=true",
        "ppo.lora.r=4", "ppo.lagrangian=true", "ppo.lambda_lr=1.0", "ppo.cost_threshold=-1.0",
        f"ppo.rewards=[{{type: rule, name: '{RULE}'}}, {{type: cost, name: '{RULE}'}}]",
        "run.name=lora", f"ppo.policy={sft_root / 't' / 'sft'}",
    )
    assert manifest["extras"]["lora"] is True
    lambdas = [r["objective/lambda"] for r in rows]
    assert lambdas[0] > 1.0 and lambdas[-1] > lambdas[0]
    assert manifest["metrics"]["trainable_params"] < manifest["metrics"]["total_params"] / 10
    # The merged LoRA policy is a plain transformers folder.
    assert not (sft_root / "lora" / "ppo" / "model" / "adapter_config.json").exists()


def test_two_process_ddp(sft_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m", "pipeline.cli", "ppo",
           *overrides(sft_root, "ppo.num_updates=2", "ppo.batch_size=4",
                      "ppo.num_minibatches=1", "run.name=ddp",
                      f"ppo.policy={sft_root / 't' / 'sft'}")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((sft_root / "ddp" / "ppo" / MANIFEST).read_text())
    assert manifest["metrics"]["world_size"] == 2

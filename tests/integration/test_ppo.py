"""PPO on a tiny random model: it follows a reward, respects the KL leash, resumes exactly,
starts at KL 0 in bf16, feeds its controllers the right statistics, follows the Lagrangian
mix, and gives the same metrics on 2 processes as on 1."""

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
from transformers import AutoModelForCausalLM

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.rundir import MANIFEST
from stages import ops, ppo, sft
from tests.conftest import assert_same_metrics, logged_rows, tiny_override_list
from tests.integration.scripted_ppo import scripted_generate

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
RULE = "tests.integration.ppo_rules:brevity"
VERBOSITY = "tests.integration.ppo_rules:verbosity"
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
    # The policy moved away from the reference, and every KL-derived curve is the same
    # per-sequence KL: the score minus beta times it is the RLHF reward.
    assert mean(rows, "objective/kl", slice(-5, None)) > 0.05
    for r in rows:
        assert math.isfinite(r["objective/kl"])
        assert r["objective/non_score_reward"] == pytest.approx(
            -r["objective/kl_coef"] * r["objective/kl"], rel=1e-4, abs=1e-6)
        assert r["objective/rlhf_reward"] == pytest.approx(
            r["objective/scores"] + r["objective/non_score_reward"], rel=1e-4, abs=1e-6)
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
    # The checkpoint's model/ opens with from_pretrained and holds the policy it resumes.
    checkpoint = stage / "checkpoints" / "step-0000002"
    opened = AutoModelForCausalLM.from_pretrained(checkpoint / "model").state_dict()
    saved = load_file(str(checkpoint / "policy.safetensors"))
    assert saved and all(torch.equal(opened[k.removeprefix("model.")], v)
                         for k, v in saved.items())
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
        "run.name=lora", f"ppo.policy={sft_root / 't' / 'sft'}", "ppo.save_every=2",
    )
    assert manifest["extras"]["lora"] is True
    lambdas = [r["objective/lambda"] for r in rows]
    assert lambdas[0] > 1.0 and lambdas[-1] > lambdas[0]
    assert manifest["metrics"]["trainable_params"] < manifest["metrics"]["total_params"] / 10
    # The merged LoRA policy is a plain transformers folder, and so is its checkpoint's.
    stage = sft_root / "lora" / "ppo"
    for folder in (stage / "model", stage / "checkpoints" / "step-0000002" / "model"):
        assert not (folder / "adapter_config.json").exists()
        assert not any("lora" in k for k in load_file(str(folder / "model.safetensors")))
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_starts_at_kl_zero(sft_root, monkeypatch, lora):
    """bf16 autocast (the shipped GPU configs; mixed_precision=auto on a CPU with AMX). The
    reference, the sampler and the scorer all run under the policy's autocast, so policy and
    reference agree before the first update."""
    autocast_in_sampler = []
    real_generate = ppo.generate

    def spy(*args, **kwargs):
        autocast_in_sampler.append(torch.is_autocast_enabled("cpu"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(ppo, "generate", spy)
    _, rows = run_ppo(sft_root, "ppo.num_updates=1", "ppo.batch_size=8",
                      "ppo.mixed_precision=bf16", f"ppo.lora.enabled={str(lora).lower()}",
                      "ppo.lora.r=4", f"run.name=bf16-{lora}", "ppo.forward_batch_size=4",
                      f"ppo.policy={sft_root / 't' / 'sft'}")
    assert abs(rows[0]["objective/kl"]) < 1e-6, rows[0]["objective/kl"]
    assert autocast_in_sampler == [True]


@pytest.mark.parametrize("name", ["gpu_single.yaml", "gpu_multi.yaml"])
def test_shipped_gpu_configs_are_the_bf16_case_tested_above(name):
    c = load_config(ROOT / "configs" / name).ppo
    assert (c.mixed_precision, c.lora.enabled) == ("bf16", False)


def test_kl_controller_gets_the_mean_per_sequence_kl(sft_root, monkeypatch):
    """Fed a per-token mean instead, the adaptive controller would aim at a KL T times
    smaller than ppo.kl_target."""
    seen_by_controller, blocks = [], []

    class Recording(ops.AdaptiveKLController):
        def update(self, current_kl, n_steps):
            seen_by_controller.append((current_kl, n_steps))
            super().update(current_kl, n_steps)

    real = ops.ppo_advantages

    def recording_advantages(scores, logp, ref_logp, values, mask, **kwargs):
        out = real(scores, logp, ref_logp, values, mask, **kwargs)
        blocks.append((out.kl.clone(), mask.clone()))
        return out

    monkeypatch.setattr(ops, "AdaptiveKLController", Recording)
    monkeypatch.setattr(ops, "ppo_advantages", recording_advantages)
    _, rows = run_ppo(sft_root, "ppo.num_updates=3", "ppo.batch_size=8", "ppo.adaptive_kl=true",
                      "ppo.kl_coef=0.01", "run.name=klctl", f"ppo.policy={sft_root / 't' / 'sft'}")
    assert len(seen_by_controller) == len(blocks) == 3
    for (current_kl, n_steps), (kl, mask), row in zip(seen_by_controller, blocks, rows):
        per_sequence = (kl * mask).sum(dim=1)  # summed over each response's tokens
        assert current_kl == pytest.approx(per_sequence.mean().item(), rel=1e-5, abs=1e-7)
        assert n_steps == 8
        assert row["objective/kl"] == pytest.approx(current_kl, rel=1e-5, abs=1e-7)
    assert abs(seen_by_controller[-1][0]) > 1e-3  # a KL that a per-token mean would shrink


def test_lagrangian_policy_follows_the_mixed_objective(sft_root):
    """Reward and cost are the same verbosity score: with lambda fixed at 4 the policy climbs
    (1 - 4) / (1 + 4) * verbosity, so it must get shorter, though the reward alone says longer."""
    _, rows = run_ppo(
        sft_root, "ppo.num_updates=20", "ppo.kl_coef=0.01", "ppo.lagrangian=true",
        "ppo.lambda_init=4.0", "ppo.lambda_lr=0.0",
        f"ppo.rewards=[{{type: rule, name: '{VERBOSITY}'}}, {{type: cost, name: '{VERBOSITY}'}}]",
        "run.name=lagrangian", f"ppo.policy={sft_root / 't' / 'sft'}")
    assert all(r["objective/lambda"] == 4.0 for r in rows)
    key = "reward/cost/verbosity"
    start, end = mean(rows, key, slice(0, 3)), mean(rows, key, slice(-3, None))
    assert end < start - 0.25, (start, end)
    assert rows[-1]["objective/cost"] == pytest.approx(rows[-1][key], rel=1e-5)


def ddp_args(root: Path, name: str, batch_size: int) -> list[str]:
    return overrides(root, "ppo.num_updates=2", f"ppo.batch_size={batch_size}",
                     "ppo.num_minibatches=1", "ppo.ppo_epochs=2", "ppo.response_length=8",
                     "ppo.adaptive_kl=true", "ppo.kl_horizon=16", "ppo.lagrangian=true",
                     "ppo.lambda_lr=1.0",
                     f"ppo.rewards=[{{type: rule, name: '{RULE}'}}, "
                     f"{{type: cost, name: '{VERBOSITY}'}}]",
                     f"run.name={name}", f"ppo.policy={root / 't' / 'sft'}")


def test_two_processes_match_one(sft_root, monkeypatch):
    """One batch of 8 on one process and 2 x 4 on two (DDP over gloo), on identical scripted
    rollouts: every logged metric and the trained weights agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m", "tests.integration.scripted_ppo",
           "ppo", *ddp_args(sft_root, "ddp2", 4)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.setattr(ppo, "generate", scripted_generate)
    one = ppo.run(load_config(None, ddp_args(sft_root, "ddp1", 8)))

    two = sft_root / "ddp2" / "ppo"
    assert json.loads((two / MANIFEST).read_text())["metrics"]["world_size"] == 2
    rows = {"one": logged_rows(one), "two": logged_rows(two)}
    assert len(rows["one"]) == 2
    assert_same_metrics(rows["one"], rows["two"])
    assert rows["one"][1]["objective/kl"] > 1e-3  # the first update moved the policy
    assert rows["one"][1]["objective/kl_coef"] != rows["one"][0]["objective/kl_coef"]
    weights_one = load_file(str(one / "model" / "model.safetensors"))
    weights_two = load_file(str(two / "model" / "model.safetensors"))
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, atol=1e-5, rtol=1e-4, msg=key)

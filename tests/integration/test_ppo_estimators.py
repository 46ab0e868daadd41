"""The critic-free estimators in the PPO stage, on a tiny random model: each follows a reward
with k responses per prompt and builds, trains and saves no critic; the KL as a loss term
holds the policy near the reference; a critic-free run resumes exactly; and 2 processes
match 1 with group baselines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.rundir import MANIFEST
from stages import ppo, sft
from tests.conftest import assert_same_metrics, logged_rows
from tests.integration.scripted_groups import scripted_group_generate
from tests.integration.test_ppo import RULE, mean, overrides, run_ppo

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
# 4 prompts x 4 responses: the 16 responses per rollout of test_ppo's runs.
GROUPS = ["ppo.batch_size=4", "ppo.samples_per_prompt=4"]
ESTIMATORS = {
    "rloo": [],
    # GRPO as DeepSeekMath has it: the KL (k3) in the loss, here with the adaptive controller.
    "grpo": ["ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.adaptive_kl=true",
             "ppo.kl_target=0.5", "ppo.kl_horizon=100"],
    "reinforce_pp": [],
}


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("estimators")
    sft.run(load_config(None, overrides(root)))
    return root


def policy_arg(root: Path) -> str:
    return f"ppo.policy={root / 't' / 'sft'}"


@pytest.fixture(scope="module")
def runs(sft_root) -> dict[str, tuple[dict, list[dict], list]]:
    """One 12-update run per critic-free estimator, with the reward-backbone loads recorded
    (a rule-only gae run builds its critic from one)."""
    out = {}
    real = ppo.load_reward_backbone
    for name, extra in ESTIMATORS.items():
        loads: list = []

        def recording(*args, loads=loads, **kwargs):
            loads.append(args)
            return real(*args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ppo, "load_reward_backbone", recording)
            manifest, rows = run_ppo(sft_root, "ppo.num_updates=12", "ppo.kl_coef=0.01",
                                     "ppo.save_every=6", f"ppo.advantage_estimator={name}",
                                     *GROUPS, *extra, f"run.name={name}", policy_arg(sft_root))
        out[name] = (manifest, rows, loads)
    return out


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_raises_the_reward(runs, name):
    manifest, rows, _ = runs[name]
    key = "reward/rule/brevity"
    start, end = mean(rows, key, slice(0, 3)), mean(rows, key, slice(-3, None))
    assert end > start + 0.25, (start, end)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert mean(rows, "objective/kl", slice(-5, None)) > 0.05
    assert manifest["status"] == "complete" and manifest["metrics"]["updates"] == 12
    extras = manifest["extras"]
    assert (extras["advantage_estimator"], extras["samples_per_prompt"]) == (name, 4)
    assert extras["critic"] is False


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_builds_trains_and_saves_no_critic(runs, sft_root, name):
    _, rows, loads = runs[name]
    assert loads == []
    for key in ("loss/value", "val/error", "val/grad_norm", "lr/critic"):
        assert all(key not in r for r in rows), key
    stage = sft_root / name / "ppo"
    assert not [p for p in stage.rglob("*") if "critic" in p.name]
    checkpoint = stage / "checkpoints" / "step-0000006"
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == ["policy.safetensors"]
    assert set(torch.load(checkpoint / "optim.pt", weights_only=True)) == {"policy",
                                                                           "policy_sched"}
    # The policy itself trained.
    before = load_file(str(sft_root / "t" / "sft" / "model" / "model.safetensors"))
    after = load_file(str(stage / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gae_still_builds_its_critic(sft_root, monkeypatch):
    """The control for the test above: the rule-only gae run loads its critic's backbone."""
    loads = []
    real = ppo.load_reward_backbone
    monkeypatch.setattr(ppo, "load_reward_backbone",
                        lambda *a, **kw: loads.append(a) or real(*a, **kw))
    manifest, rows = run_ppo(sft_root, "ppo.num_updates=1", "ppo.batch_size=4",
                             "run.name=gae1", policy_arg(sft_root))
    assert len(loads) == 1 and manifest["extras"]["critic"] is True
    assert "loss/value" in rows[0] and "lr/critic" in rows[0]


def test_critic_free_lora_scores_with_the_reward_model(sft_root):
    """With LoRA the gae reward is the critic's base with its adapter off; without a critic
    the reward model is loaded on its own, and its scores reach the rollout."""
    from pipeline.models import load_reward_backbone, load_tokenizer, tokenizer_sha256
    from pipeline.rundir import StageDir

    cfg = load_config(None, overrides(sft_root))
    model_dir = sft_root / "t" / "sft" / "model"
    tok = load_tokenizer(str(model_dir), cfg.model)
    rm_stage = StageDir(cfg, "rm")
    rm_stage.start()
    load_reward_backbone(str(model_dir), cfg.model, tok, seed=5).save_pretrained(
        rm_stage.path / "model")
    tok.save_pretrained(rm_stage.path / "model")
    rm_stage.finish(metrics={}, extras={"norm_bias": 0.0, "norm_scale": 1.0, "norm_samples": 0},
                    tokenizer_sha256=tokenizer_sha256(tok))
    manifest, rows = run_ppo(sft_root, "ppo.num_updates=1", "ppo.advantage_estimator=rloo",
                             "ppo.batch_size=2", "ppo.samples_per_prompt=2",
                             "ppo.lora.enabled=true", "ppo.lora.r=4",
                             "ppo.rewards=[{type: model}]", "run.name=lora-rm",
                             policy_arg(sft_root), f"ppo.reward_model={rm_stage.path}")
    assert manifest["extras"]["critic"] is False
    assert abs(rows[0]["reward/rm_raw"]) > 1e-6
    assert rows[0]["reward/model"] == pytest.approx(rows[0]["reward/rm_raw"], rel=1e-5)


def test_kl_loss_term_and_adaptive_controller(runs):
    """GRPO with the KL in the loss: logged, and the controller still steers its weight
    (the KL sits above the 0.5 target, so beta grows)."""
    _, rows, _ = runs["grpo"]
    assert all("loss/kl" in r for r in rows)
    assert all("loss/kl" not in r for r in runs["rloo"][1])
    betas = [r["objective/kl_coef"] for r in rows]
    assert betas[0] == 0.01 and betas[-1] > betas[0] * 1.1, betas


def test_kl_in_the_loss_keeps_the_policy_near_the_reference(sft_root):
    args = ("ppo.num_updates=8", "ppo.advantage_estimator=grpo", *GROUPS, "ppo.kl_in=loss",
            "ppo.kl_estimator=k2", policy_arg(sft_root))
    _, free = run_ppo(sft_root, *args, "ppo.kl_coef=0.0", "run.name=grpo-free")
    _, held = run_ppo(sft_root, *args, "ppo.kl_coef=3.0", "run.name=grpo-held")
    kl_free = mean(free, "objective/kl", slice(-4, None))
    kl_held = mean(held, "objective/kl", slice(-4, None))
    assert kl_held < kl_free / 2, (kl_held, kl_free)


def test_critic_free_resume_matches_uninterrupted_run(sft_root):
    args = ("ppo.num_updates=4", "ppo.save_every=2", "ppo.batch_size=4",
            "ppo.samples_per_prompt=2", "ppo.advantage_estimator=rloo", "run.name=resume-rloo",
            policy_arg(sft_root))
    _, full = run_ppo(sft_root, *args)
    stage = sft_root / "resume-rloo" / "ppo"
    full_weights = load_file(str(stage / "model" / "model.safetensors"))
    (stage / MANIFEST).unlink()
    shutil.rmtree(stage / "model")
    _, resumed = run_ppo(sft_root, *args, "run.resume=true")
    resumed_weights = load_file(str(stage / "model" / "model.safetensors"))
    for k in full_weights:
        assert torch.allclose(full_weights[k], resumed_weights[k], atol=1e-6), k
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["objective/kl"] == pytest.approx(full[-1]["objective/kl"], abs=1e-6)


def group_ddp_args(root: Path, name: str, batch_size: int) -> list[str]:
    return overrides(root, "ppo.num_updates=2", f"ppo.batch_size={batch_size}",
                     "ppo.samples_per_prompt=2", "ppo.advantage_estimator=rloo",
                     "ppo.num_minibatches=1", "ppo.ppo_epochs=2", "ppo.response_length=8",
                     "ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.adaptive_kl=true",
                     "ppo.kl_horizon=16", f"ppo.rewards=[{{type: rule, name: '{RULE}'}}]",
                     f"run.name={name}", policy_arg(root))


def test_group_estimator_on_two_processes_matches_one(sft_root, monkeypatch):
    """4 prompts x 2 responses on one process and 2 x (2 x 2) on two, on scripted rollouts
    whose two responses to a prompt differ: each prompt's group stays on one process, so the
    baselines, the KL loss, the controller and the weights agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m",
           "tests.integration.scripted_groups", "ppo", *group_ddp_args(sft_root, "gddp2", 2)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.setattr(ppo, "generate", scripted_group_generate)
    one = ppo.run(load_config(None, group_ddp_args(sft_root, "gddp1", 4)))

    two = sft_root / "gddp2" / "ppo"
    rows = {"one": logged_rows(one), "two": logged_rows(two)}
    assert len(rows["one"]) == 2
    assert_same_metrics(rows["one"], rows["two"])
    # The first update moved the policy: the group's two responses differ, so the baseline
    # left a signal (the k3 loss has no gradient while the policy is the reference).
    assert rows["one"][1]["objective/kl"] > 1e-3
    weights_one = load_file(str(one / "model" / "model.safetensors"))
    weights_two = load_file(str(two / "model" / "model.safetensors"))
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, atol=1e-5, rtol=1e-4, msg=key)

"""The reward model and PPO under FSDP2 on 2 CPU processes (gloo) against one process.

accelerate runs FSDP on GPUs only; ``tests.integration.fsdp_cpu`` switches its state to FSDP
after the gloo group is up, so its own FSDP2 code shards the models here (each launch reports
every prepared parameter as a DTensor shard, which the tests check). One process with a batch
of B and two with B/2 each then train on the same rows: the logged metrics, the saved model
and a resume from an FSDP checkpoint must agree with one process to float32 round-off
(rel 1e-4, abs 1e-6 on metrics; atol 1e-5, rtol 1e-4 on weights).
"""

from __future__ import annotations

import json
import os
import re
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
from stages import ppo, reward, sft
from tests.conftest import assert_same_metrics, logged_rows, tiny_override_list
from tests.integration.scripted_ppo import scripted_generate
from tests.integration.test_ppo import ddp_args
from tests.integration.test_reward import toy_rows, write_jsonl

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "2",
          "--mixed_precision", "no", "-m", "tests.integration.fsdp_cpu"]


def launch_fsdp(stage: str, args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*LAUNCH, stage, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def assert_sharded(stdout: str, *models: str) -> None:
    """Every prepared model, on both processes, reported all its parameters as shards."""
    for model in models:
        lines = re.findall(rf"fsdp2 prepared FSDP{model}: (\d+) of (\d+) parameters are "
                           r"shards over 2 processes", stdout)
        assert len(lines) == 2, (model, stdout[-2000:])
        assert all(int(n) == int(total) > 0 for n, total in lines), lines


def assert_same_weights(one: Path, two: Path) -> None:
    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (one, two))
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=1e-5, rtol=1e-4, msg=key)


def kill_after_checkpoint(stage: Path, step: str) -> None:
    """What a kill after the ``step`` checkpoint leaves: no manifest, no final model."""
    (stage / MANIFEST).unlink()
    shutil.rmtree(stage / "model")
    assert (stage / "checkpoints" / "latest").read_text().strip() == step


@pytest.mark.slow
def test_sft_runs_under_fsdp(root: Path) -> None:
    """SFT's loss is each process's token mean (as under DDP), so it is not compared with one
    process; its samples and saved model come from the whole copy."""
    stdout = launch_fsdp("sft", [*tiny_override_list(root, "fsdp_sft"), "sft.max_steps=2",
                                 "sft.batch_size=2", "sft.save_every=1", "sft.num_samples=2"])
    assert_sharded(stdout, "LlamaForCausalLM")
    stage = root / "fsdp_sft" / "sft"
    assert json.loads((stage / MANIFEST).read_text())["metrics"]["world_size"] == 2
    assert len((stage / "samples.jsonl").read_text().splitlines()) == 2
    # The whole model (not a shard) was saved: the same tensors as a one-process run saves.
    trained = load_file(str(stage / "model" / "model.safetensors"))
    one = load_file(str(root / "t" / "sft" / "model" / "model.safetensors"))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in one.items()}
    assert all(torch.isfinite(v).all() for v in trained.values())


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A two-step SFT policy (PPO's scripted rollouts end in EOS whatever it has learned) and
    ranked rows for the reward model."""
    root = tmp_path_factory.mktemp("fsdp")
    sft.run(load_config(None, [*tiny_override_list(root, "t"), "sft.max_steps=2",
                               "sft.num_samples=0"]))
    write_jsonl(root / "toy.jsonl", toy_rows(24))
    return root


def rm_args(root: Path, name: str, batch_size: int) -> list[str]:
    """A LoRA reward model: its adapter starts from random weights that each process draws
    with its own seed, so FSDP must start every process from the main one's. The
    normalization samples with each process's own seed too: its statistics differ."""
    return [*tiny_override_list(root, name), f"rm.sft={root / 't' / 'sft'}", "rm.lora.enabled=true",
            f"rm.data={root / 'toy.jsonl'}", "rm.max_steps=3", "rm.eval_size=4",
            "rm.eval_every=2", "rm.save_every=2", "rm.norm_samples=4", "rm.log_every=1",
            "rm.lr=3e-3", "rm.max_seq_len=64", "rm.max_new_tokens=8",
            f"rm.batch_size={batch_size}"]


@pytest.fixture(scope="module")
def rm_runs(root: Path) -> tuple[Path, Path, str]:
    stdout = launch_fsdp("rm", rm_args(root, "fsdp", 2))
    one = reward.run(load_config(None, rm_args(root, "one", 4)))
    torch.set_num_threads(1)
    return one, root / "fsdp" / "rm", stdout


def test_reward_model_under_fsdp_matches_one_process(rm_runs) -> None:
    one, two, stdout = rm_runs
    assert_sharded(stdout, "ScoreModel")
    manifest = json.loads((two / MANIFEST).read_text())
    assert manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["eval_accuracy_after"] != manifest["metrics"]["eval_accuracy_before"]
    # Training, the periodic and final evaluations (on the whole copy) and the saved model.
    assert_same_metrics(logged_rows(one), logged_rows(two), skip=("norm/",))
    assert_same_weights(one, two)
    # The checkpoint holds whole tensors, as one process writes them.
    saved = load_file(str(two / "checkpoints" / "step-0000002" / "reward.safetensors"))
    head = [name for name in saved if name.endswith("score.modules_to_save.default.weight")]
    assert len(head) == 1 and saved[head[0]].shape == (1, 32), list(saved)
    assert json.loads((two / "checkpoints" / "step-0000002" / "state.json").read_text()
                      )["backend"] == "fsdp"


def test_fsdp_checkpoint_is_refused_by_one_process(rm_runs, tmp_path: Path) -> None:
    _, two, _ = rm_runs
    copy = two.parents[1] / "refused" / "rm"
    shutil.copytree(two, copy)
    kill_after_checkpoint(copy, "step-0000002")
    root = two.parents[1]
    with pytest.raises(PipelineError, match=r"step-0000002: written under fsdp and this run is "
                                            r"under replicated; resume it with the accelerate"):
        reward.run(load_config(None, [*rm_args(root, "refused", 2), "run.resume=true"]))


@pytest.mark.slow
def test_reward_model_resumes_under_fsdp(rm_runs) -> None:
    one, two, _ = rm_runs
    kill_after_checkpoint(two, "step-0000002")
    launch_fsdp("rm", [*rm_args(two.parents[1], "fsdp", 2), "run.resume=true"])
    assert_same_weights(one, two)
    resumed = json.loads((two / MANIFEST).read_text())["metrics"]
    whole = json.loads((one / MANIFEST).read_text())["metrics"]
    for key in ("eval_accuracy_after", "eval_margin_after", "eval_ece_after"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_runs(root: Path) -> tuple[Path, Path, str]:
    """Scripted rollouts (the same responses whatever each process samples), two updates of
    two PPO epochs, adaptive KL and a Lagrange multiplier, a checkpoint after update 1."""
    stdout = launch_fsdp("ppo", [*ddp_args(root, "fsdp", 4), "ppo.save_every=1"])
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ppo, "generate", scripted_generate)
    try:
        one = ppo.run(load_config(None, [*ddp_args(root, "one", 8), "ppo.save_every=1"]))
    finally:
        monkeypatch.undo()
    torch.set_num_threads(1)
    return one, root / "fsdp" / "ppo", stdout


def test_ppo_under_fsdp_matches_one_process(ppo_runs) -> None:
    one, two, stdout = ppo_runs
    assert_sharded(stdout, "PolicyModel", "ScoreModel")
    assert json.loads((two / MANIFEST).read_text())["metrics"]["world_size"] == 2
    metrics = logged_rows(one)
    assert abs(metrics[1]["objective/kl"]) > 1e-3  # the first update moved the policy
    assert metrics[1]["objective/kl_coef"] != metrics[0]["objective/kl_coef"]
    assert metrics[1]["objective/lambda"] != metrics[0]["objective/lambda"]
    assert_same_metrics(metrics, logged_rows(two))
    assert_same_weights(one, two)


@pytest.mark.slow
def test_ppo_resumes_under_fsdp(ppo_runs) -> None:
    """From the update-1 checkpoint: weights, optimizer moments, KL coefficient and Lagrange
    multiplier restored, so update 2 is the uninterrupted run's."""
    one, two, _ = ppo_runs
    state = json.loads((two / "checkpoints" / "step-0000001" / "state.json").read_text())
    assert {"kl_ctl", "lagrange"} <= state.keys()
    full = logged_rows(two)
    kill_after_checkpoint(two, "step-0000001")
    launch_fsdp("ppo", [*ddp_args(two.parents[1], "fsdp", 4), "ppo.save_every=1",
                        "run.resume=true"])
    assert_same_metrics(full, logged_rows(two))
    assert_same_weights(one, two)


@pytest.mark.slow
def test_ppo_with_lora_under_fsdp_matches_one_process(root: Path) -> None:
    """LoRA: the reference is the policy with its adapter off, the reward model the critic's
    base with its adapter off, both run through the sharded models' own forwards."""
    args = [*ddp_args(root, "fsdp_lora", 4), "ppo.lora.enabled=true"]
    stdout = launch_fsdp("ppo", args)
    assert_sharded(stdout, "PolicyModel", "ScoreModel")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ppo, "generate", scripted_generate)
    try:
        one = ppo.run(load_config(None, [*ddp_args(root, "one_lora", 8),
                                         "ppo.lora.enabled=true"]))
    finally:
        monkeypatch.undo()
    torch.set_num_threads(1)
    two = root / "fsdp_lora" / "ppo"
    assert logged_rows(one)[1]["objective/kl"] != 0.0
    assert_same_metrics(logged_rows(one), logged_rows(two))
    assert_same_weights(one, two)

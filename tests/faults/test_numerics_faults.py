"""Numerics faults: a non-finite loss, gradient norm, reward, KL or evaluation metric stops the
stage with one line naming the stage, the step and the value (exit 1); no manifest is written,
and the last checkpoint, written before the fault, stays usable."""

from __future__ import annotations

import json
import math
import shutil

import torch

import stages.sft
from pipeline.rundir import MANIFEST
from tests.faults.helpers import (
    RULE_ONLY,
    chain_args,
    cli,
    error_line,
    fingerprint,
    incomplete,
    nan_model,
    same_weights,
)

GUARD = r"not a finite number .*; nothing was marked complete; "


def test_sft_learning_rate_that_diverges(tmp_path, capsys):
    code, _, err = cli(capsys, "sft", *chain_args(tmp_path / "runs", "n"), "sft.lr=1e9")
    assert code == 1
    error_line(err, r"^error: sft: stopped at step \d+: (train loss|gradient norm) is (nan|inf), "
                    + GUARD)
    assert incomplete(tmp_path / "runs" / "n" / "sft")


def test_rm_learning_rate_that_diverges(finished, tmp_path, capsys):
    code, _, err = cli(capsys, "rm", *chain_args(tmp_path / "runs", "n"), "rm.lr=1e9",
                       f"rm.sft={finished / 'done' / 'sft'}",
                       f"rm.data={finished / 'done' / 'label' / 'data.jsonl'}")
    assert code == 1
    error_line(err, r"^error: rm: stopped at step \d+: (train loss|gradient norm) is (nan|inf), "
                    + GUARD)
    assert incomplete(tmp_path / "runs" / "n" / "rm")


def test_ppo_learning_rate_that_diverges(finished, tmp_path, capsys):
    code, _, err = cli(capsys, "ppo", *chain_args(tmp_path / "runs", "n"), RULE_ONLY,
                       "ppo.lr=1e12", "ppo.critic_lr=1e12", "ppo.num_updates=3",
                       f"ppo.policy={finished / 'done' / 'sft'}")
    assert code == 1
    line = error_line(err, r"^error: ppo: stopped at update \d+: .* is (nan|inf)")
    assert "nothing was marked complete" in line
    assert incomplete(tmp_path / "runs" / "n" / "ppo")


def test_sft_from_a_base_model_with_nan_weights(finished, tmp_path, capsys):
    base = nan_model(finished / "done" / "sft" / "model", tmp_path / "nan")
    code, _, err = cli(capsys, "sft", *chain_args(tmp_path / "runs", "n"),
                       "model.init=pretrained", f"model.name_or_path={base}")
    assert code == 1
    error_line(err, r"^error: sft: stopped at step 0: eval loss is nan, " + GUARD
                    + "no checkpoint was saved before it")
    assert incomplete(tmp_path / "runs" / "n" / "sft")


def test_rm_from_a_base_with_nan_weights(finished, tmp_path, capsys):
    base = nan_model(finished / "done" / "sft" / "model", tmp_path / "nan")
    code, _, err = cli(capsys, "rm", *chain_args(tmp_path / "runs", "n"), f"rm.base={base}",
                       f"rm.sft={finished / 'done' / 'sft'}",
                       f"rm.data={finished / 'done' / 'label' / 'data.jsonl'}")
    assert code == 1
    error_line(err, r"^error: rm: stopped at step 0: held-out eval_margin is nan, " + GUARD)
    assert incomplete(tmp_path / "runs" / "n" / "rm")


def test_ppo_on_a_policy_with_nan_weights(finished, tmp_path, capsys):
    run = tmp_path / "runs" / "n"
    shutil.copytree(finished / "done" / "sft", run / "sft", ignore=shutil.ignore_patterns("model"))
    nan_model(finished / "done" / "sft" / "model", run / "sft" / "model")
    code, _, err = cli(capsys, "ppo", *chain_args(tmp_path / "runs", "n"), RULE_ONLY)
    assert code == 1
    error_line(err, r"^error: ppo: stopped at update 1: KL to the reference is nan "
                    r"\(response 0\), " + GUARD)
    assert incomplete(run / "ppo")


def test_ppo_with_a_reward_model_whose_normalization_is_nan(finished, tmp_path, capsys):
    run = tmp_path / "runs" / "n"
    for stage in ("sft", "rm"):
        shutil.copytree(finished / "done" / stage, run / stage)
    manifest = json.loads((run / "rm" / MANIFEST).read_text())
    manifest["extras"]["norm_scale"] = math.nan
    (run / "rm" / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = cli(capsys, "ppo", *chain_args(tmp_path / "runs", "n"))
    assert code == 1
    error_line(err, r"^error: ppo: stopped at update 1: reward model is nan \(response 0\), "
                    + GUARD)
    assert incomplete(run / "ppo")


def test_nan_after_a_checkpoint_keeps_it_and_resume_from_it_matches(finished, tmp_path, capsys,
                                                                     monkeypatch):
    """A NaN loss at step 3 (one bad batch) stops SFT after its step-2 checkpoint; resuming
    from that checkpoint gives the uninterrupted run's weights, bit for bit."""
    real = stages.sft.token_loss_sums
    calls = {"train": 0}

    def nan_at_step_3(model, batch):
        nll, count = real(model, batch)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 3:
                return nll * math.nan, count
        return nll, count

    monkeypatch.setattr(stages.sft, "token_loss_sums", nan_at_step_3)
    args = chain_args(tmp_path / "runs", "n")
    code, _, err = cli(capsys, "sft", *args)
    stage = tmp_path / "runs" / "n" / "sft"
    assert code == 1
    error_line(err, r"^error: sft: stopped at step 3: train loss is nan, " + GUARD
                    + rf"last good checkpoint: {stage}/checkpoints/step-0000002 "
                      r"\(run\.resume=true continues from it\)")
    assert incomplete(stage)
    kept = fingerprint(stage / "checkpoints")
    assert [p.name for p in (stage / "checkpoints").iterdir() if p.name.startswith("step")] \
        == ["step-0000002"]

    monkeypatch.setattr(stages.sft, "token_loss_sums", real)
    assert fingerprint(stage / "checkpoints") == kept
    code, _, _ = cli(capsys, "sft", *args, "run.resume=true")
    assert code == 0 and not incomplete(stage)
    same_weights(stage / "model", finished / "done" / "sft" / "model")

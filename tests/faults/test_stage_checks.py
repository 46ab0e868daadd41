"""Every stage refuses a bad input in its check, before its folder is touched: fed one over the
finished stage (``run.overwrite=true``), it exits 1 with one line naming the problem, and the
finished folder is byte for byte as it was (the DPO case is in tests/integration/test_dpo.py,
over its finished toy stage)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.rundir import MANIFEST
from tests.faults.helpers import chain_args, cli, error_line, fingerprint, incomplete


def refused_over_finished(capsys, finished: Path, stage: str, pattern: str, *bad: str,
                          folder: Path | None = None) -> None:
    """``rlhf STAGE`` over the finished run with ``bad``: exit 1, the one error line matches
    ``pattern``, and ``folder`` (the stage's own by default) is unchanged and complete."""
    folder = folder or finished / "done" / stage
    before = fingerprint(folder)
    code, _, err = cli(capsys, stage, *chain_args(finished, "done"), "run.overwrite=true", *bad)
    assert code == 1, err
    error_line(err, pattern)
    assert fingerprint(folder) == before
    assert not incomplete(folder)


def edited_copy(source: Path, target: Path, **manifest_changes) -> Path:
    """A copy of a finished stage whose manifest has ``manifest_changes`` (extras merged)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    extras = manifest_changes.pop("extras", None)
    manifest.update(manifest_changes)
    if extras is not None:
        manifest["extras"] = extras(manifest["extras"])
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def test_sft_refuses_missing_sample_prompts(finished, tmp_path, capsys):
    refused_over_finished(capsys, finished, "sft", r"missing\.jsonl: no such file",
                          f"data.eval={tmp_path / 'missing.jsonl'}")


def test_label_refuses_an_unfinished_policy(finished, tmp_path, capsys):
    unfinished = tmp_path / "sft"
    shutil.copytree(finished / "done" / "sft", unfinished)
    (unfinished / MANIFEST).unlink()
    refused_over_finished(capsys, finished, "label",
                          rf"^error: label\.policy: {unfinished} has no manifest\.json; the sft "
                          r"stage did not finish", f"label.policy={unfinished}")


def test_rm_refuses_a_parent_of_the_wrong_stage(finished, capsys):
    refused_over_finished(capsys, finished, "rm",
                          r"^error: rm\.sft: .*/done/ppo is a 'ppo' stage, expected sft",
                          f"rm.sft={finished / 'done' / 'ppo'}")


def test_ppo_refuses_a_reward_model_without_its_normalization(finished, tmp_path, capsys):
    rm = edited_copy(finished / "done" / "rm", tmp_path / "rm",
                     extras=lambda e: {k: v for k, v in e.items() if k != "norm_scale"})
    refused_over_finished(capsys, finished, "ppo",
                          rf"^error: {rm / MANIFEST}: extras has no norm_scale: the reward "
                          r"model's normalization", f"ppo.reward_model={rm}")


def test_eval_refuses_a_reward_model_with_another_tokenizer(finished, tmp_path, capsys):
    rm = edited_copy(finished / "done" / "rm", tmp_path / "rm", tokenizer_sha256="0" * 64)
    refused_over_finished(capsys, finished, "eval",
                          rf"^error: eval\.reward_model: {rm} was trained with a different "
                          "tokenizer", f"eval.reward_model={rm}")


def test_eval_refuses_a_ppo_stage_whose_reward_record_is_broken(finished, tmp_path, capsys):
    ppo = edited_copy(finished / "done" / "ppo", tmp_path / "ppo",
                      extras=lambda e: {**e, "reward": {"terms": "model"}})
    refused_over_finished(capsys, finished, "eval",
                          rf"^error: {ppo / MANIFEST}: extras\.reward: not a reward spec",
                          f"eval.ppo={ppo}")


def test_report_refuses_damaged_results_and_keeps_the_old_report(finished, tmp_path, capsys):
    run = tmp_path / "runs" / "done"
    for stage in ("sft", "eval"):
        shutil.copytree(finished / "done" / stage, run / stage,
                        ignore=shutil.ignore_patterns("model", "checkpoints"))
    shutil.copy(finished / "done" / "report.html", run / "report.html")
    (run / "eval" / "results.json").write_text('{"policies": {')
    before = (run / "report.html").read_bytes()
    code, _, err = cli(capsys, "report", *chain_args(tmp_path / "runs", "done"))
    assert code == 1
    error_line(err, rf"^error: {run / 'eval' / 'results.json'}: not valid JSON")
    assert (run / "report.html").read_bytes() == before

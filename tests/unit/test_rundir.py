"""Run directories: atomic writes, the stage lifecycle, manifests and the parent checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import config_sha256, load_config, to_yaml
from pipeline.errors import PipelineError
from pipeline.files import apply_umask
from pipeline.rundir import (
    MANIFEST,
    SCHEMA,
    StageDir,
    atomic_write_json,
    atomic_write_text,
    check_same_tokenizer,
    file_sha256,
    open_parent,
    ppo_algorithm,
    read_manifest,
    stage_dir,
)

MANIFEST_KEYS = {"schema", "stage", "status", "created", "run", "git_sha", "config_sha256",
                 "parents", "base_model", "tokenizer_sha256", "metrics", "extras"}


def make_cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r", *overrides])


def finished_stage(tmp_path: Path, stage: str = "sft", tokenizer: str = "tok-a", **kw) -> Path:
    cfg = make_cfg(tmp_path, *kw.pop("overrides", ()))
    sd = StageDir(cfg, stage)
    sd.start()
    return sd.finish(metrics={"loss": 1.0}, tokenizer_sha256=tokenizer, **kw)


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_text_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """mkstemp creates 0600; the renamed file gets what open() would give it."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.html", "<html></html>")
        atomic_write_json(tmp_path / MANIFEST, {"a": 1})
        sd = StageDir(make_cfg(tmp_path), "sft")
        sd.start()
        (tmp_path / "lib").mkdir()
        (tmp_path / "lib" / "weights").write_text("x")
        (tmp_path / "lib" / "weights").chmod(0o600)
        apply_umask(tmp_path / "lib")
    finally:
        os.umask(old)
    for path in (tmp_path / "report.html", tmp_path / MANIFEST, sd.path / "config.yaml",
                 tmp_path / "lib" / "weights"):
        assert path.stat().st_mode & 0o777 == mode, path


def test_atomic_write_json_round_trip(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": [1, 2], "b": None})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "b": None}


# --- StageDir lifecycle -----------------------------------------------------------------------


def test_start_writes_resolved_config(tmp_path):
    cfg = make_cfg(tmp_path, "sft.lr=0.125")
    sd = StageDir(cfg, "sft")
    sd.start()
    assert sd.path == tmp_path / "runs" / "r" / "sft"
    assert (sd.path / "config.yaml").read_text() == to_yaml(cfg)
    assert read_manifest(sd.path) is None


def test_unknown_stage_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        StageDir(make_cfg(tmp_path), "nope")


def test_start_refuses_complete_stage_without_overwrite(tmp_path):
    path = finished_stage(tmp_path)
    (path / "keep.txt").write_text("x")
    with pytest.raises(PipelineError, match="run.overwrite=true") as exc:
        StageDir(make_cfg(tmp_path), "sft").start()
    assert str(path) in str(exc.value)
    assert (path / "keep.txt").exists() and read_manifest(path) is not None


def test_start_refuses_resume_of_complete_stage(tmp_path):
    path = finished_stage(tmp_path)
    with pytest.raises(PipelineError, match="nothing to resume"):
        StageDir(make_cfg(tmp_path, "run.resume=true"), "sft").start()
    assert read_manifest(path) is not None


def test_start_with_overwrite_clears_stage(tmp_path):
    path = finished_stage(tmp_path)
    (path / "stale.txt").write_text("x")
    StageDir(make_cfg(tmp_path, "run.overwrite=true"), "sft").start()
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml"]


def test_start_clears_incomplete_stage_unless_resuming(tmp_path):
    cfg = make_cfg(tmp_path)
    sd = StageDir(cfg, "sft")
    sd.start()
    (sd.checkpoints).mkdir()
    (sd.checkpoints / "latest").write_text("step-0000002\n")
    StageDir(make_cfg(tmp_path, "run.resume=true"), "sft").start()
    assert (sd.checkpoints / "latest").is_file()
    StageDir(cfg, "sft").start()
    assert not sd.checkpoints.exists()


def test_non_main_process_writes_nothing(tmp_path):
    sd = StageDir(make_cfg(tmp_path), "sft", is_main=False)
    sd.start()
    sd.write_jsonl(sd.samples_path, [{"a": 1}])
    sd.finish(metrics={})
    assert not sd.path.exists()


def test_finish_writes_every_manifest_field(tmp_path):
    parent_path = finished_stage(tmp_path, "sft", overrides=())
    parent = open_parent(parent_path, "sft", "policy")
    cfg = make_cfg(tmp_path)
    sd = StageDir(cfg, "rm")
    sd.start()
    out = sd.finish(metrics={"acc": 0.75}, extras={"bias": -0.5}, parents={"sft": parent},
                    base_model="m", tokenizer_sha256="tok-a")
    assert out == sd.path
    m = json.loads((out / MANIFEST).read_text())
    assert set(m) == MANIFEST_KEYS
    assert m["schema"] == SCHEMA
    assert m["stage"] == "rm" and m["status"] == "complete" and m["run"] == "r"
    assert m["created"].endswith("+00:00")
    assert m["git_sha"] is None or isinstance(m["git_sha"], str)
    assert m["config_sha256"] == config_sha256(cfg)
    assert m["parents"] == {"sft": {"path": str(parent_path),
                                    "manifest_sha256": file_sha256(parent_path / MANIFEST)}}
    assert m["base_model"] == "m" and m["tokenizer_sha256"] == "tok-a"
    assert m["metrics"] == {"acc": 0.75} and m["extras"] == {"bias": -0.5}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_write_jsonl(tmp_path):
    sd = StageDir(make_cfg(tmp_path), "sft")
    sd.start()
    sd.write_jsonl(sd.samples_path, [{"a": "é"}, {"b": 2}])
    lines = sd.samples_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [{"a": "é"}, {"b": 2}]


def test_stage_dir_default_and_override(tmp_path):
    cfg = make_cfg(tmp_path)
    assert stage_dir(cfg, "sft", "") == tmp_path / "runs" / "r" / "sft"
    assert stage_dir(cfg, "sft", "/elsewhere/sft") == Path("/elsewhere/sft")


# --- open_parent ------------------------------------------------------------------------------


def test_open_parent_ok(tmp_path):
    path = finished_stage(tmp_path)
    parent = open_parent(path, ("sft", "ppo"), "policy")
    assert parent.stage == "sft" and parent.model_dir == path / "model"
    assert parent.manifest_sha256 == file_sha256(path / MANIFEST)
    assert parent.ref() == {"path": str(path), "manifest_sha256": parent.manifest_sha256}


def test_open_parent_missing_dir(tmp_path):
    missing = tmp_path / "nothing" / "sft"
    with pytest.raises(PipelineError, match="does not exist") as exc:
        open_parent(missing, "sft", "policy")
    assert str(missing) in str(exc.value) and "policy" in str(exc.value)


def test_open_parent_without_manifest(tmp_path):
    path = tmp_path / "sft"
    (path / "model").mkdir(parents=True)
    with pytest.raises(PipelineError, match=MANIFEST) as exc:
        open_parent(path, "sft", "policy")
    assert str(path) in str(exc.value)


def test_open_parent_wrong_stage(tmp_path):
    path = finished_stage(tmp_path, "rm")
    with pytest.raises(PipelineError, match="expected sft") as exc:
        open_parent(path, "sft", "policy")
    assert str(path) in str(exc.value) and "'rm'" in str(exc.value)


def test_open_parent_incomplete_status(tmp_path):
    path = finished_stage(tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    m["status"] = "running"
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(PipelineError, match="status") as exc:
        open_parent(path, "sft", "policy")
    assert str(path) in str(exc.value)


def test_open_parent_bad_json_and_schema(tmp_path):
    path = finished_stage(tmp_path)
    m = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**m, "schema": "other/v0"}))
    with pytest.raises(PipelineError, match="schema") as exc:
        open_parent(path, "sft", "policy")
    assert str(path) in str(exc.value)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(PipelineError, match="not valid JSON") as exc:
        open_parent(path, "sft", "policy")
    assert str(path) in str(exc.value)


def test_check_same_tokenizer(tmp_path):
    parent = open_parent(finished_stage(tmp_path, tokenizer="a" * 64), "sft", "policy")
    check_same_tokenizer("a" * 64, parent, "reward model")
    with pytest.raises(PipelineError, match="different tokenizer") as exc:
        check_same_tokenizer("b" * 64, parent, "reward model")
    assert str(parent.path) in str(exc.value) and "reward model" in str(exc.value)


def test_ppo_algorithm_label_from_manifest():
    # A PPO manifest from before the estimator was a choice: gae, one response per prompt.
    assert ppo_algorithm({"extras": {"lora": True}}) == {
        "advantage_estimator": "gae", "samples_per_prompt": 1, "kl_in": "reward",
        "critic": True, "label": "gae"}
    rloo = ppo_algorithm({"extras": {"advantage_estimator": "rloo", "samples_per_prompt": 4,
                                     "kl_in": "reward", "critic": False}})
    assert rloo["label"] == "rloo, k=4" and rloo["critic"] is False
    dr = ppo_algorithm({"extras": {"advantage_estimator": "grpo", "samples_per_prompt": 2,
                                   "kl_in": "loss", "grpo_std_normalize": False}})
    assert dr["label"] == "dr_grpo, k=2, KL in loss"

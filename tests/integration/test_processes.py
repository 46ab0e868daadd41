"""A stage sharded across two spawned CPU processes of one gloo group (run_sharded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import processes
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.rundir import read_manifest
from tests.conftest import tiny_override_list

LABEL = ["label.num_prompts=6", "label.k=3", "label.max_new_tokens=6", "label.batch_size=2"]


def test_label_sharded_across_two_processes_ranks_every_prompt_once(tmp_path: Path,
                                                                    tiny_sft_run: Path):
    cfg = load_config(None, [*tiny_override_list(tmp_path, name="sharded"),
                             f"label.policy={tiny_sft_run}", *LABEL])
    processes.run_sharded("stages.label", cfg, 2)

    folder = tmp_path / "sharded" / "label"
    manifest = read_manifest(folder)
    assert manifest["status"] == "complete"
    assert manifest["metrics"]["world_size"] == 2
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["prompt"] for r in rows}) == 6
    assert all(len(r["responses"]) == 3 for r in rows)


def test_a_failed_process_stops_the_group_with_one_line(tmp_path: Path, monkeypatch, capfd):
    monkeypatch.setattr(processes, "STOP_SECONDS", 1.0)
    cfg = load_config(None, tiny_override_list(tmp_path))
    with pytest.raises(PipelineError, match=r"process 1 of 2 exited with code 1"):
        processes.run_sharded("tests.integration.sharded_member", cfg, 2)
    assert "error: member 1 cannot go on" in capfd.readouterr().err


def test_the_group_environment_is_what_torchrun_sets():
    env = processes.group_env(1, 2, 29555, 3)
    assert env == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555",
                   "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "3"}
    with pytest.raises(ValueError):
        processes.run_sharded("stages.label", load_config(None, []), 1)

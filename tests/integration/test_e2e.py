"""The whole chain through the CLI on the quick preset, as `make pipeline CONFIG=configs/quick.yaml`
runs it (minutes on 2 cores: `make test-all`, not CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "pipeline", "--config", "configs/quick.yaml",
           f"run.root={tmp_path}", "run.name=e2e", "tracking.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "e2e"
    for stage, parents in (("sft", set()), ("label", {"policy"}), ("rm", {"sft", "label"}),
                           ("ppo", {"policy", "reward_model"}),
                           ("eval", {"sft", "ppo", "reward_model"})):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
        assert set(manifest["parents"]) == parents, stage
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["policies"]) == {"base", "sft", "bon", "ppo"}
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "ppo" in status.stdout

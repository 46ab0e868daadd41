"""Fixtures of the fault suite: one finished tiny chain, and an SFT stage killed after its
step-2 checkpoint, both built once per session and only ever copied or read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from tests.faults.helpers import chain_args, kill_after_checkpoint


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """``runs/done`` after `rlhf pipeline`: sft, label, rm, ppo, eval and report complete.

    Overwrite cases point at it with bad inputs and check it is untouched; chain cases copy
    parts of it and compare their results with it.
    """
    root = tmp_path_factory.mktemp("faults")
    assert main(["pipeline", *chain_args(root, "done")]) == 0
    torch.set_num_threads(1)
    return root


@pytest.fixture(scope="session")
def killed_sft_template(tmp_path_factory) -> Path:
    """An SFT stage (4 steps, a checkpoint every 2) as a kill after step 2 leaves it."""
    root = tmp_path_factory.mktemp("killed")
    assert main(["sft", *chain_args(root, "template")]) == 0
    torch.set_num_threads(1)
    stage = root / "template" / "sft"
    kill_after_checkpoint(stage)
    # Rows logged after the checkpoint stay, as after a real kill; resume drops them.
    return stage


@pytest.fixture
def killed_sft(killed_sft_template, tmp_path) -> tuple[Path, str]:
    """A private copy of the killed SFT stage: (runs root, run name)."""
    root = tmp_path / "runs"
    shutil.copytree(killed_sft_template, root / "k" / "sft")
    return root, "k"

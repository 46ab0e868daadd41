"""Shared fixtures: a tiny scratch model's overrides and one SFT run reused across tests.

The machines this runs on have few cores shared with other jobs, so every process is pinned to
one intra-op thread and nothing reaches the network. The tokenizer comes from the packaged
SmolLM2 model, converted once into the default cache ($RLHF_CACHE or ~/.cache/rlhf-pipeline)
and reused by every later test and session.
"""

from __future__ import annotations

import json  # noqa: E402
import os

# Before torch / tokenizers / wandb are imported by any test module.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "wordnet"


def tiny_override_list(root: Path | str, name: str = "tiny", layers: int = 1) -> list[str]:
    """Overrides that make SFT on a random-init model take seconds on one CPU thread."""
    return [
        f"run.root={root}",
        f"run.name={name}",
        "run.threads=1",
        "run.device=cpu",
        "model.init=scratch",
        "model.scratch.hidden_size=32",
        f"model.scratch.num_layers={layers}",
        "model.scratch.num_heads=4",
        "model.scratch.num_kv_heads=2",
        "model.scratch.intermediate_size=64",
        "model.scratch.max_position_embeddings=128",
        f"data.sft={DATA / 'sft.jsonl'}",
        f"data.label={DATA / 'label.jsonl'}",
        f"data.ppo={DATA / 'ppo.jsonl'}",
        f"data.eval={DATA / 'eval.jsonl'}",
        "data.max_prompt_tokens=48",
        "sft.max_steps=4",
        "sft.batch_size=4",
        "sft.lr=3e-3",
        "sft.warmup_ratio=0",
        "sft.lr_scheduler=constant",
        "sft.train_size=32",
        "sft.eval_size=8",
        "sft.max_seq_len=48",
        "sft.num_samples=2",
        "sft.max_new_tokens=8",
        "sft.log_every=1",
        "tracking.progress=false",
    ]


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Override strings for a tiny scratch model whose runs live under ``tmp_path``."""
    return tiny_override_list(tmp_path / "runs")


@pytest.fixture(scope="session")
def tiny_sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny SFT stage (its folder), shared read-only by the tests that inspect it."""
    from pipeline.config import load_config
    from stages import sft

    root = tmp_path_factory.mktemp("shared_runs")
    cfg = load_config(None, tiny_override_list(root, name="shared"))
    path = sft.run(cfg)
    torch.set_num_threads(1)
    return path


def logged_rows(stage: Path) -> list[dict]:
    """A stage's metrics.jsonl, one dict per logged line."""
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(one: list[dict], two: list[dict], skip: tuple[str, ...] = ()) -> None:
    """Two runs logged the same metrics (timings aside) within float tolerance."""
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            if not key.startswith(("time/", "perf/", *skip)):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

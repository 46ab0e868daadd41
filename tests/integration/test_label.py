"""The label stage on a tiny SFT policy: handoff, ranked output, annotator noise, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import DataError, PromptExample, load_ranked
from pipeline.errors import PipelineError
from pipeline.rundir import read_manifest
from stages import label, sft
from stages.judge import AnnotatorPool, AnnotatorSpec

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs" / "quick.yaml"
DATA = REPO / "data" / "wordnet"

# Small enough that SFT plus a label run take seconds on one thread.
TINY = [
    "run.threads=1",
    "run.device=cpu",
    "tracking.progress=false",
    "model.scratch.hidden_size=32",
    "model.scratch.num_layers=1",
    "model.scratch.intermediate_size=64",
    "model.scratch.max_position_embeddings=128",
    f"data.sft={DATA / 'sft.jsonl'}",
    f"data.label={DATA / 'label.jsonl'}",
    f"data.eval={DATA / 'eval.jsonl'}",
    "data.max_prompt_tokens=48",
    "sft.max_steps=2",
    "sft.batch_size=4",
    "sft.train_size=16",
    "sft.eval_size=8",
    "sft.max_seq_len=48",
    "sft.num_samples=0",
    "label.num_prompts=8",
    "label.k=3",
    "label.max_new_tokens=8",
    # Two generate calls per process, so batching is exercised.
    "label.batch_size=4",
]


def config(root: Path, name: str, *extra: str):
    return load_config(QUICK, [f"run.root={root}", f"run.name={name}", *TINY, *extra])


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("label_runs")
    return sft.run(config(root, "t"))


@pytest.fixture(scope="module")
def label_dir(sft_dir: Path) -> Path:
    return label.run(config(sft_dir.parents[1], "t"))


def test_manifest_and_rows(sft_dir: Path, label_dir: Path) -> None:
    manifest = read_manifest(label_dir)
    assert manifest["status"] == "complete" and manifest["stage"] == "label"
    assert Path(manifest["parents"]["policy"]["path"]) == sft_dir
    sft_manifest = read_manifest(sft_dir)
    assert manifest["tokenizer_sha256"] == sft_manifest["tokenizer_sha256"]
    assert manifest["base_model"] == sft_manifest["base_model"]

    m = manifest["metrics"]
    for key in ("prompts", "rows", "skipped_prompts", "mean_distinct_responses",
                "gen_tokens_per_s", "gen_seconds", "judge_seconds", "wall_seconds",
                "mean_gold_score", "agreement_with_gold", "mean_response_tokens", "frac_no_eos"):
        assert key in m, key
    assert m["prompts"] == 8
    assert m["rows"] + m["skipped_prompts"] == 8 and m["rows"] >= 1
    assert 0.0 <= m["agreement_with_gold"] <= 1.0
    assert 0.0 <= m["frac_no_eos"] <= 1.0
    assert 0 < m["mean_response_tokens"] <= 8
    assert m["gen_tokens_per_s"] > 0

    rows = [json.loads(line) for line in (label_dir / "data.jsonl").read_text().splitlines()]
    ranked = load_ranked(label_dir / "data.jsonl")
    assert len(rows) == len(ranked) == m["rows"]
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids), "rows must keep the prompt file's order"
    for row, ex in zip(rows, ranked):
        k = len(row["responses"])
        assert 2 <= k <= 3
        assert len(set(row["responses"])) == k, "label.dedup=true leaves distinct responses"
        assert len(row["gold_scores"]) == k and row["reference"]
        # Plackett-Luce annotators with temperature > 0 give a strict order.
        assert sorted(row["ranks"]) == list(range(k))
        assert 0 <= row["annotator"] < 4
        assert ex.responses == tuple(row["responses"]) and ex.ranks == tuple(row["ranks"])
    assert (label_dir / "samples.jsonl").is_file()
    assert (label_dir / "metrics.jsonl").is_file()


def test_noiseless_annotators_agree_with_gold(sft_dir: Path) -> None:
    path = label.run(config(sft_dir.parents[1], "noiseless", f"label.policy={sft_dir}",
                            "label.annotators.temperature=0", "label.annotators.flip_prob=0"))
    assert read_manifest(path)["metrics"]["agreement_with_gold"] == 1.0


def test_parent_without_manifest_is_refused(sft_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sft_copy"
    shutil.copytree(sft_dir, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(PipelineError, match=str(broken)):
        label.run(config(tmp_path, "orphan", f"label.policy={broken}"))
    assert not (tmp_path / "orphan" / "label").exists()


def test_prompts_without_reference_are_refused(sft_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": 'Define the word "cat" in one sentence.'}) + "\n")
    with pytest.raises(DataError, match=str(prompts)):
        label.run(config(tmp_path, "noref", f"label.policy={sft_dir}", f"data.label={prompts}"))


def test_row_round_trip(tmp_path: Path) -> None:
    example = PromptExample(prompt="Define the word \"cat\" in one sentence.",
                            reference="Feline mammal usually having thick soft fur.",
                            word="cat", id="wn-1")
    responses = label.distinct_responses(["A pet.", "", "A small feline.", "A pet."], dedup=True)
    assert responses == ["A pet.", "A small feline."]
    pool = AnnotatorPool([AnnotatorSpec(0.0, 0.0)], seed=0)
    row = label.ranked_row(example, responses, [0.2, 0.7], pool, key=3)
    assert row["ranks"] == [1, 0] and row["annotator"] == 0
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (loaded,) = load_ranked(path)
    assert loaded.prompt == example.prompt and loaded.reference == example.reference
    assert loaded.responses == tuple(responses) and loaded.ranks == (1, 0)

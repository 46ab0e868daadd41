"""Every stage on TRL's conversational forms: the tiny chain with message-list prompts (multi-turn
for PPO), renamed columns, a reward model on implicit-prompt conversational pairs, and SFT on
plain "text" rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline.text
from pipeline.rundir import read_manifest
from tests.conftest import DATA
from tests.faults.helpers import chain_args, cli, write_jsonl

SYSTEM = {"role": "system", "content": "Answer in one sentence."}


def rows(split: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").open()][:n]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversational_data(folder: Path) -> list[str]:
    """The WordNet splits in conversational forms; the overrides that point the chain at them."""
    sft = write_jsonl(folder / "sft.jsonl", [
        {"question": [user(r["prompt"])], "answer": [assistant(r["completion"])]}
        for r in rows("sft", 48)])
    label = write_jsonl(folder / "label.jsonl", [
        {"prompt": [SYSTEM, user(r["prompt"])], "reference": r["reference"], "word": r["word"]}
        for r in rows("label", 16)])
    # Multi-turn: an earlier exchange precedes the question PPO trains on.
    ppo = write_jsonl(folder / "ppo.jsonl", [
        {"prompt": [user("Are you ready?"), assistant("Yes."), user(r["prompt"])]}
        for r in rows("ppo", 8)])
    # Conversations: the last answer is the reference the judge scores against.
    evals = write_jsonl(folder / "eval.jsonl", [
        {"messages": [user(r["prompt"]), assistant(r["reference"])], "word": r["word"]}
        for r in rows("eval", 8)])
    return [f"data.sft={sft}", f"data.label={label}", f"data.ppo={ppo}", f"data.eval={evals}",
            "data.columns.sft={question: prompt, answer: completion}"]


def record_prompts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """What each stage asks ``encode_prompt`` to format, by module; "text" is
    ``pipeline.text.greedy_samples``, through which SFT samples its prompts."""
    seen: dict[str, list] = {}
    original = pipeline.text.encode_prompt
    for module in ("stages.label", "stages.reward", "stages.ppo", "stages.evaluate",
                   "pipeline.text"):
        name = module.split(".")[-1]

        def recording(tok, messages, max_prompt_tokens, _name=name):
            seen.setdefault(_name, []).append(messages)
            return original(tok, messages, max_prompt_tokens)

        monkeypatch.setattr(f"{module}.encode_prompt", recording)
    return seen


def test_chain_on_conversational_forms(tmp_path: Path, capsys,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    overrides = conversational_data(tmp_path)
    seen = record_prompts(monkeypatch)
    code, _, err = cli(capsys, "pipeline", *chain_args(root, "conv"), *overrides)
    assert code == 0, err
    # Every stage formats the conversations, not their last turn alone: the reward model's
    # normalization and PPO the multi-turn prompts, label and the RM the system-led ones.
    assert seen["ppo"] and all(isinstance(m, list) and len(m) == 3
                               and m[0]["content"] == "Are you ready?" for m in seen["ppo"])
    assert any(isinstance(m, list) and len(m) == 3 for m in seen["reward"])
    assert seen["label"] and all(m[0] == SYSTEM for m in seen["label"])
    assert any(isinstance(m, list) and m[0] == SYSTEM for m in seen["reward"])
    # Eval's prompts are conversations; its calibration questions are its own text.
    assert sum(isinstance(m, list) for m in seen["evaluate"]) == 4
    assert seen["text"] and all(isinstance(m, list) for m in seen["text"])
    run = root / "conv"
    for stage in ("sft", "label", "rm", "ppo", "eval"):
        assert read_manifest(run / stage)["status"] == "complete", stage
    assert read_manifest(run / "sft")["metrics"]["train_rows"] == 32
    # The label stage keeps each prompt's messages, so the reward model trains on them.
    labelled = [json.loads(line) for line in (run / "label" / "data.jsonl").open()]
    assert labelled and all(row["prompt"][0] == SYSTEM for row in labelled)
    samples = [json.loads(line) for line in (run / "label" / "samples.jsonl").open()]
    assert all(s["prompt"].startswith("Define the word") for s in samples)

    # A reward model on user pairs whose prompt is the conversation the two share.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": [user(r["prompt"]), assistant(r["completion"])],
         "rejected": [user(r["prompt"]), assistant("I do not know.")]}
        for r in rows("sft", 24)])
    code, _, err = cli(capsys, "rm", *chain_args(root, "conv"), *overrides, f"rm.data={pairs}",
                       "run.overwrite=true")
    assert code == 0, err
    manifest = read_manifest(run / "rm")
    assert manifest["status"] == "complete"
    assert manifest["metrics"]["train_rows"] + manifest["metrics"]["eval_rows"] == 24


def test_sft_on_text_rows(tmp_path: Path, capsys) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [
        {"text": f"{r['word']}: {r['completion']}"} for r in rows("sft", 48)])
    root = tmp_path / "runs"
    code, _, err = cli(capsys, "sft", *chain_args(root, "text"), f"data.sft={text}")
    assert code == 0, err
    manifest = read_manifest(root / "text" / "sft")
    assert manifest["status"] == "complete"
    assert manifest["metrics"]["train_rows"] == 32

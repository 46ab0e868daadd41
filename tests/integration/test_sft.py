"""SFT end to end on a tiny random model (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import ModelConfig, config_sha256, load_config
from pipeline.errors import PipelineError
from pipeline.models import build_scratch, load_policy, load_tokenizer, tokenizer_sha256
from pipeline.rundir import SCHEMA, latest_checkpoint, open_parent
from pipeline.text import IGNORE_INDEX, tokenize_conversation
from stages import sft
from tests.conftest import tiny_override_list

TOP_LEVEL = {"config.yaml", "manifest.json", "metrics.jsonl", "samples.jsonl", "model"}
MODEL_FILES = {"config.json", "model.safetensors", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"}


def weights(stage: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage / "model" / "model.safetensors"))


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_parameters_change_and_eval_loss_drops(tiny_sft_run):
    cfg = load_config(tiny_sft_run / "config.yaml")
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model)
    initial = build_scratch(cfg.model, tok, seed=cfg.run.seed)
    trained = weights(tiny_sft_run)
    initial_state = initial.state_dict()
    for name, param in trained.items():
        # TRL style: every trained tensor moved away from its initial value.
        assert not torch.allclose(param, initial_state[name]), f"{name} did not change"
    m = json.loads((tiny_sft_run / "manifest.json").read_text())["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"]


def test_without_the_eval_before_training(tmp_path, tiny_sft_run):
    folder = sft.run(load_config(None, [*tiny_override_list(tmp_path, name="nobefore"),
                                        "sft.eval_before=false"]))
    torch.set_num_threads(1)
    m = json.loads((folder / "manifest.json").read_text())["metrics"]
    shared = json.loads((tiny_sft_run / "manifest.json").read_text())["metrics"]
    assert m["eval_loss_before"] is None
    # The pass it skips changes nothing the run trains or measures after.
    assert m["eval_loss_after"] == shared["eval_loss_after"]
    assert all(a.equal(b) for a, b in zip(weights(folder).values(),
                                          weights(tiny_sft_run).values()))
    assert [r["step"] for r in rows(folder / "metrics.jsonl") if "eval/loss" in r] == [m["steps"]]


def test_stage_folder_file_set(tiny_sft_run):
    assert {p.name for p in tiny_sft_run.iterdir()} == TOP_LEVEL
    assert {p.name for p in (tiny_sft_run / "model").iterdir()} == MODEL_FILES
    assert not list(tiny_sft_run.rglob("*.tmp")) and not list(tiny_sft_run.rglob("*.bin"))


def test_manifest(tiny_sft_run):
    m = json.loads((tiny_sft_run / "manifest.json").read_text())
    cfg = load_config(tiny_sft_run / "config.yaml")
    assert m["schema"] == SCHEMA and m["stage"] == "sft" and m["status"] == "complete"
    assert m["run"] == cfg.run.name == "shared"
    assert m["config_sha256"] == config_sha256(cfg)
    assert m["parents"] == {}
    # Random weights: no base model, only a tokenizer borrowed from one.
    assert m["base_model"] is None
    tok = load_tokenizer(str(tiny_sft_run / "model"), ModelConfig())
    assert m["tokenizer_sha256"] == tokenizer_sha256(tok)
    assert m["extras"] == {"lora": False, "init": "scratch",
                           "tokenizer_from": "smollm2-135m-instruct",
                           "scratch": dataclasses.asdict(cfg.model.scratch)}
    metrics = m["metrics"]
    assert metrics["steps"] == cfg.sft.max_steps == 4
    assert metrics["train_rows"] == cfg.sft.train_size and metrics["eval_rows"] == cfg.sft.eval_size
    assert metrics["world_size"] == 1
    assert metrics["trainable_params"] == metrics["total_params"] > 0
    parent = open_parent(tiny_sft_run, "sft", "policy")
    assert parent.model_dir.is_dir()


def test_model_card(tiny_sft_run):
    """model/README.md: what the model is, from what, on what data, how it scored, and a
    loading snippet that runs as written."""
    card = (tiny_sft_run / "model" / "README.md").read_text()
    m = json.loads((tiny_sft_run / "manifest.json").read_text())
    cfg = load_config(tiny_sft_run / "config.yaml")
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "base_model:" not in card.split("---")[1]
    assert "randomly initialized Llama-style model" in card
    assert f"`{cfg.model.name_or_path}`" in card and cfg.data.sft in card
    assert f"| eval_loss_after | {m['metrics']['eval_loss_after']:.4g} |" in card
    assert f"rlhf-pipeline at git `{m['git_sha']}`" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f"path = {str(tiny_sft_run / 'model')!r}" in snippet
    exec(compile(snippet.replace("max_new_tokens=48", "max_new_tokens=4"), "card", "exec"), {})


def test_metrics_and_samples(tiny_sft_run):
    logged = rows(tiny_sft_run / "metrics.jsonl")
    train = [r for r in logged if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    evals = [r for r in logged if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    samples = rows(tiny_sft_run / "samples.jsonl")
    assert len(samples) == 2
    assert all(set(s) == {"prompt", "reference", "response"} for s in samples)


def test_saved_model_loads_as_policy(tiny_sft_run):
    model, tok = load_policy(ModelConfig(), name_or_path=str(tiny_sft_run / "model"))
    trained = weights(tiny_sft_run)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert tok.pad_token_id != tok.eos_token_id


def test_loss_only_on_completion_tokens(tiny_sft_run):
    model, tok = load_policy(ModelConfig(), name_or_path=str(tiny_sft_run / "model"))
    messages = [{"role": "user", "content": 'Define the word "cat" in one sentence.'},
                {"role": "assistant", "content": "A small domesticated feline."}]
    ids, labels = tokenize_conversation(tok, messages, 48, 64)
    batch = sft.collate([(ids, labels)], tok.pad_token_id)
    completion = tok("A small domesticated feline.", add_special_tokens=False)["input_ids"]
    nll, count = sft.token_loss_sums(model, batch)
    assert int(count) == len(completion) + 1  # the answer and its EOS
    # The loss is exactly the NLL of the answer tokens, recomputed by hand.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert torch.allclose(nll.detach(), manual, rtol=1e-5)
    assert tok.decode(targets[keep]) == "A small domesticated feline.<|im_end|>"


def test_lora_on_pretrained_folder_merges(tmp_path, tiny_overrides):
    base_cfg = load_config(None, tiny_overrides)
    tok = load_tokenizer(base_cfg.model.name_or_path, base_cfg.model)
    base = build_scratch(base_cfg.model, tok, seed=0)
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = load_config(None, [*tiny_overrides, f"model.name_or_path={folder}",
                             "model.init=pretrained", "model.lora.enabled=true",
                             "model.lora.r=4", "model.lora.alpha=8", "run.name=lora",
                             "sft.lr=1e-2"])
    path = sft.run(cfg)
    files = {p.name for p in (path / "model").iterdir()}
    assert not any("adapter" in f for f in files), files
    assert "model.safetensors" in files
    m = json.loads((path / "manifest.json").read_text())
    assert m["extras"]["lora"] is True
    assert 0 < m["metrics"]["trainable_params"] < m["metrics"]["total_params"]
    trained = weights(path)
    assert not any("lora" in k for k in trained)
    base_state = base.state_dict()
    assert set(trained) <= set(base_state)
    # The adapter was merged: linear weights moved, embeddings and norms did not.
    changed = {k for k, v in trained.items() if not torch.equal(v, base_state[k])}
    assert any("q_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "norm" in k for k in changed)
    model, _ = load_policy(ModelConfig(), name_or_path=str(path / "model"))
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("extra", [
    pytest.param(["sft.save_every=2", "sft.max_steps=4"], id="mid-epoch"),
    # 2 batches per epoch: the checkpoint at step 3 is in the middle of the second epoch.
    pytest.param(["sft.save_every=3", "sft.max_steps=6", "sft.train_size=8",
                  "sft.lr_scheduler=cosine", "sft.warmup_ratio=0.2"], id="later-epoch"),
])
def test_resume_matches_uninterrupted(tmp_path, tiny_overrides, extra):
    straight = sft.run(load_config(None, [*tiny_overrides, *extra, "run.name=straight"]))
    killed_overrides = [*tiny_overrides, *extra, "run.name=killed"]
    killed = sft.run(load_config(None, killed_overrides))
    assert (killed / "checkpoints" / "latest").is_file()
    # A mid-run checkpoint opens with plain from_pretrained: the weights it would resume.
    checkpoint = latest_checkpoint(killed / "checkpoints")
    opened = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    AutoTokenizer.from_pretrained(checkpoint / "model")
    saved = load_file(str(checkpoint / "policy.safetensors"))
    state = opened.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    # Simulate a kill after the last checkpoint: no manifest, no final model.
    (killed / "manifest.json").unlink()
    shutil.rmtree(killed / "model")
    resumed = sft.run(load_config(None, [*killed_overrides, "run.resume=true"]))
    assert resumed == killed
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ma = json.loads((straight / "manifest.json").read_text())["metrics"]
    mb = json.loads((resumed / "manifest.json").read_text())["metrics"]
    assert mb["eval_loss_after"] == pytest.approx(ma["eval_loss_after"], abs=1e-5)
    assert mb["eval_loss_before"] == ma["eval_loss_before"]
    # The resumed curve is the uninterrupted one: same steps, no duplicated rows.
    def curve(path):
        return [(r["step"], sorted(k for k in r if k not in ("time", "perf/tokens_per_s")))
                for r in rows(path / "metrics.jsonl")]
    assert curve(resumed) == curve(straight)
    losses_a = [r["train/loss"] for r in rows(straight / "metrics.jsonl") if "train/loss" in r]
    losses_b = [r["train/loss"] for r in rows(resumed / "metrics.jsonl") if "train/loss" in r]
    assert losses_b == pytest.approx(losses_a, abs=1e-5)


def test_resume_without_checkpoint_fails(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "run.resume=true", "run.name=nockpt"])
    with pytest.raises(PipelineError, match="no checkpoint"):
        sft.run(cfg)


def test_rerun_complete_stage_refused(tmp_path, tiny_sft_run):
    cfg = load_config(tiny_sft_run / "config.yaml")
    before = (tiny_sft_run / "manifest.json").read_text()
    with pytest.raises(PipelineError, match="already complete") as exc:
        sft.run(cfg)
    assert str(tiny_sft_run) in str(exc.value)
    assert (tiny_sft_run / "manifest.json").read_text() == before

"""Model cards and the hub upload, against a local stand-in for huggingface_hub's HfApi: no test
reaches the network."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.hub import CARD, describe_base, hub_base_model
from pipeline.rundir import MANIFEST, StageDir, read_manifest

SECRET = "hf_test_secret_token_never_printed"


class FakeHub:
    """Records what an HfApi would have been asked to do."""

    calls: list[tuple] = []
    fail: Exception | None = None

    def __init__(self, **kwargs):
        FakeHub.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        if FakeHub.fail is not None:
            raise FakeHub.fail
        folder = Path(folder_path)
        # What was there at upload time: the stage had to be sealed already.
        sealed = (read_manifest(folder.parent) or {}).get("status") == "complete"
        FakeHub.calls.append(("upload_folder", repo_id, folder,
                              sorted(p.name for p in folder.iterdir()), sealed, kwargs))


@pytest.fixture
def hub(monkeypatch):
    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHub


def model_stage(tmp_path: Path, stage: str, *overrides: str) -> StageDir:
    """A started stage whose model/ holds a (weightless) transformers config."""
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r", *overrides])
    sd = StageDir(cfg, stage)
    sd.start()
    (sd.path / "model").mkdir()
    (sd.path / "model" / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return sd


def test_finished_stage_is_pushed_after_it_is_sealed(tmp_path, hub, capfd):
    sd = model_stage(tmp_path, "sft", "run.push_to_hub=true", "run.hub_model_id=me/wordnet")
    sd.finish(metrics={"eval_loss_after": 1.5}, base_model="smollm2-135m-instruct")
    init, create, upload = hub.calls
    assert init == ("init", {})  # no token handed over: huggingface_hub finds its own
    assert create[1] == "me/wordnet-sft" and create[2]["private"] is None
    assert create[2]["exist_ok"] is True
    repo, folder, files, sealed, kwargs = upload[1:]
    assert repo == "me/wordnet-sft" and folder == sd.path / "model"
    assert files == [CARD, "config.json"] and sealed
    assert "sft" in kwargs["commit_message"]
    out, err = capfd.readouterr()
    assert "pushed" in out and "https://huggingface.co/me/wordnet-sft" in out
    # The token is nowhere: not printed, not in any file the run wrote.
    assert SECRET not in out + err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and SECRET in p.read_text()]
    card = (sd.path / "model" / CARD).read_text()
    assert "path = 'me/wordnet-sft'" in card  # the card shows how to load it from the hub
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card


def test_private_repo_and_stage_placeholder(tmp_path, hub):
    sd = model_stage(tmp_path, "ppo", "run.push_to_hub=true",
                     "run.hub_model_id=me/{stage}-definitions", "run.hub_private=true")
    sd.finish(metrics={})
    create = hub.calls[1]
    assert create[1] == "me/ppo-definitions" and create[2]["private"] is True


def test_no_push_without_the_flag_or_without_a_model(tmp_path, hub):
    model_stage(tmp_path, "sft").finish(metrics={})
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r",
                             "run.push_to_hub=true", "run.hub_model_id=me/x"])
    sd = StageDir(cfg, "eval")
    sd.start()
    sd.finish(metrics={})
    assert hub.calls == []


def test_failed_upload_keeps_the_stage_complete(tmp_path, hub):
    hub.fail = OSError("connection reset by peer\nmore detail")
    sd = model_stage(tmp_path, "rm", "run.push_to_hub=true", "run.hub_model_id=me/w")
    with pytest.raises(PipelineError) as exc:
        sd.finish(metrics={})
    message = str(exc.value)
    assert "\n" not in message and "me/w-rm" in message and "connection reset" in message
    assert f"hf upload me/w-rm {sd.path / 'model'}" in message
    assert read_manifest(sd.path)["status"] == "complete"


def test_push_is_refused_before_training_without_a_token(tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    cfg = load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r",
                             "run.push_to_hub=true", "run.hub_model_id=me/w"])
    with pytest.raises(PipelineError, match="no Hugging Face token.*HF_TOKEN"):
        StageDir(cfg, "sft").start()
    assert not (tmp_path / "runs" / "r" / "sft").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE"):
        StageDir(cfg, "sft").check()


def test_card_of_a_chain(tmp_path):
    """The PPO card names the chain it came from: its parents, their parents, the base."""
    sft = model_stage(tmp_path, "sft")
    sft.finish(metrics={"eval_loss_after": 2.0}, base_model=None,
               extras={"init": "scratch", "tokenizer_from": "smollm2-135m-instruct",
                       "scratch": {"hidden_size": 32}})
    from pipeline.rundir import open_parent

    parent = open_parent(sft.path, "sft", "ppo.policy")
    ppo = model_stage(tmp_path, "ppo")
    ppo.finish(metrics={"kl_end": 0.25, "updates": 3}, parents={"policy": parent},
               base_model=None)
    card = (ppo.path / "model" / CARD).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model:" not in card  # random weights have no hub base model
    assert "randomly initialized" in card and "hidden_size 32" in card
    assert f"| policy | sft | `{sft.path}` |" in card
    assert "| kl_end | 0.25 |" in card and "| updates | 3 |" in card
    assert "AutoModelForCausalLM.from_pretrained(path)" in card
    assert "ppo:\n  policy: ''" in card  # the stage's hyperparameters
    assert json.loads((ppo.path / MANIFEST).read_text())["status"] == "complete"


def test_base_model_of_a_chain():
    packaged = {"stage": "sft", "base_model": "smollm2-135m-instruct", "extras": {}}
    rm = {"stage": "rm", "base_model": "/runs/x/sft/model"}
    assert hub_base_model([rm, packaged]) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model([{"stage": "sft", "base_model": "Qwen/Qwen2.5-0.5B"}]) == \
        "Qwen/Qwen2.5-0.5B"
    assert hub_base_model([{"stage": "sft", "base_model": None}]) is None
    assert "Q4_1.gguf" in describe_base([rm, packaged])
    assert "dequantized to float32" in describe_base([rm, packaged])


def test_cards_of_the_ranked_stages_name_their_data(tmp_path):
    """rm and dpo read the same ranked data: an explicit dpo.data, else data.ranked, else the
    label stage's output (a parent)."""
    label = StageDir(load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=r"]),
                     "label")
    label.start()
    label.finish(metrics={"rows": 4})
    from pipeline.rundir import open_parent

    parent = open_parent(label.path, "label", "dpo.data (label stage)")
    dpo = model_stage(tmp_path, "dpo")
    dpo.finish(metrics={"steps": 2}, parents={"label": parent})
    card = (dpo.path / "model" / CARD).read_text()
    assert "trained with DPO" in card and "tags:\n- rlhf\n- rlhf-pipeline\n- dpo" in card
    assert f"- **Data (ranked responses):** {label.path / 'data.jsonl'}" in card
    dpo = model_stage(tmp_path, "dpo", "dpo.data=mine.jsonl", "data.ranked=theirs.jsonl",
                      "run.overwrite=true")
    dpo.finish(metrics={"steps": 2})
    assert "- **Data (ranked responses):** mine.jsonl" in (dpo.path / "model" / CARD).read_text()
    rm = model_stage(tmp_path, "rm", "data.ranked=theirs.jsonl")
    rm.finish(metrics={})
    assert "- **Data (ranked responses):** theirs.jsonl" in (rm.path / "model" / CARD).read_text()

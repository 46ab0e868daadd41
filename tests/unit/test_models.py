"""Model and tokenizer loading, the packaged model cache, LoRA and atomic saving."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import LoraConfig, ModelConfig, ScratchConfig
from pipeline.errors import PipelineError
from pipeline.models import (
    apply_lora,
    build_scratch,
    disable_dropout,
    load_policy,
    load_tokenizer,
    merged,
    packaged_model_dir,
    plain_copy,
    resolve,
    save_pretrained_atomic,
    tokenizer_sha256,
    trainable_parameters,
)

TINY = ScratchConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct", ModelConfig())


@pytest.fixture
def cfg():
    return ModelConfig(init="scratch", scratch=copy.deepcopy(TINY))


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_folder_round_trip(tmp_path, tok, cfg):
    model = build_scratch(cfg, tok, seed=0)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded, tok2 = load_policy(ModelConfig(), name_or_path=str(folder))
    assert state_equal(model, loaded)
    assert tokenizer_sha256(tok2) == tokenizer_sha256(tok)
    assert loaded.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    # name_or_path wins over model.init=scratch: a stage's model/ is loaded, not rebuilt.
    loaded2, _ = load_policy(cfg, seed=123, name_or_path=str(folder))
    assert state_equal(model, loaded2)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="config.json") as exc:
        resolve(str(tmp_path / "empty"), ModelConfig())
    assert str(tmp_path / "empty") in str(exc.value)
    with pytest.raises(PipelineError, match="no config.json"):
        load_policy(ModelConfig(), name_or_path=str(tmp_path / "empty"))


def test_missing_local_path():
    with pytest.raises(PipelineError, match="no such folder"):
        resolve("/definitely/not/here", ModelConfig())


def test_packaged_model_dir_is_reused(tok):
    first = packaged_model_dir("smollm2-135m-instruct", ModelConfig())
    stamp = (first / "config.json").stat().st_mtime_ns
    weights = sorted(first.glob("*.safetensors"))
    assert weights and (first / "SOURCE.json").is_file()
    before = [w.stat().st_mtime_ns for w in weights]
    again = packaged_model_dir("smollm2-135m-instruct", ModelConfig())
    assert again == first
    assert (again / "config.json").stat().st_mtime_ns == stamp
    assert [w.stat().st_mtime_ns for w in weights] == before
    assert resolve("smollm2-135m-instruct", ModelConfig()) == str(first)


def test_tokenizer_sha256_stable_and_sensitive(tok):
    again = load_tokenizer("smollm2-135m-instruct", ModelConfig())
    assert tokenizer_sha256(again) == tokenizer_sha256(tok)
    changed = copy.deepcopy(again)
    changed.add_tokens(["<|brand_new_token|>"])
    assert tokenizer_sha256(changed) != tokenizer_sha256(tok)
    templated = copy.deepcopy(again)
    templated.chat_template = "{{ messages }}"
    assert tokenizer_sha256(templated) != tokenizer_sha256(tok)


def test_build_scratch_deterministic(tok, cfg):
    a = build_scratch(cfg, tok, seed=1)
    b = build_scratch(cfg, tok, seed=1)
    c = build_scratch(cfg, tok, seed=2)
    assert state_equal(a, b)
    assert not state_equal(a, c)
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 1
    assert a.get_input_embeddings().num_embeddings >= len(tok)


def test_build_scratch_leaves_global_rng_alone(tok, cfg):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_scratch(cfg, tok, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_dropout_disabled():
    """Llama's attention copies attention_dropout when built: zeroing the config is not enough."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    model = LlamaForCausalLM(config).train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on
        disable_dropout(model)
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert model.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)


def test_dropout_layers_of_every_kind_disabled():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Dropout1d(0.5),
                                torch.nn.AlphaDropout(0.5), torch.nn.MultiheadAttention(4, 2, 0.5))
    disable_dropout(model)
    assert [model[0].p, model[1].p, model[2].p, model[3].dropout] == [0.0] * 4


def test_apply_lora_trains_only_adapters(tok, cfg):
    model = build_scratch(cfg, tok, seed=0)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    trainable, total = trainable_parameters(peft_model)
    assert 0 < trainable < total
    # Specific target modules.
    model2 = build_scratch(cfg, tok, seed=0)
    peft2 = apply_lora(model2, LoraConfig(enabled=True, r=4, alpha=8,
                                          target_modules=["q_proj", "v_proj"]))
    names2 = {n for n, p in peft2.named_parameters() if p.requires_grad}
    assert names2 and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names2)
    # Merging an untrained adapter (B = 0) gives the base weights back.
    plain = merged(peft_model)
    assert not hasattr(plain, "peft_config")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base_state.items())


def test_save_pretrained_atomic_safetensors_only(tmp_path, tok, cfg):
    model = build_scratch(cfg, tok, seed=0)
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    save_pretrained_atomic(model, tok, target)
    files = {p.name for p in target.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert "tokenizer.json" in files or "tokenizer_config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files), files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded, _ = load_policy(ModelConfig(), name_or_path=str(target))
    assert state_equal(model, loaded)


def test_plain_copy_merges_lora_into_a_copy_and_leaves_training_alone(tok, cfg):
    model = apply_lora(build_scratch(cfg, tok, seed=0), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    plain = plain_copy(model)
    assert type(plain) is LlamaForCausalLM and not hasattr(plain, "peft_config")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
        # The training model still has its adapter, unchanged, and computes the same.
        assert torch.allclose(model(input_ids=ids).logits, expected)
    assert hasattr(model, "peft_config")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in adapter.items())
    # A model without an adapter is saved as it is, not copied.
    base = build_scratch(cfg, tok, seed=0)
    assert plain_copy(base) is base


def test_saved_model_files_follow_the_umask(tmp_path, tok, cfg):
    """safetensors writes through a private temp file (mode 0600); the saved folder gets the
    mode the user's umask asks for."""
    import os

    old = os.umask(0o022)
    try:
        save_pretrained_atomic(build_scratch(cfg, tok, seed=0), tok, tmp_path / "model")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes

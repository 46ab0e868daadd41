"""What a stage prints while it runs: per-interval lines outside a terminal, a bar inside one,
and none of the libraries' own noise unless asked for."""

from __future__ import annotations

import io
import sys
import types
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging

from pipeline import progress as progress_module
from pipeline.models import cache_name
from pipeline.progress import Progress, duration, library_output, progress_mode
from pipeline.text import generate


def test_duration():
    assert [duration(s) for s in (0, 42.4, 60, 185, 3600, 7830)] == [
        "0s", "42s", "1m00s", "3m05s", "1h00m", "2h10m"]


def test_lines_have_step_figures_and_eta(monkeypatch):
    clock = iter([100.0, 110.0, 120.0, 140.0])
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    out = io.StringIO()
    bar = Progress(4, "sft", "lines", stream=out)   # made at t=100
    bar.update(1)
    bar.log(loss=2.34567)                           # t=110: 10 s per step, 3 left
    bar.update(2)
    bar.log(loss=1.5, accuracy=0.75)                # t=120: 20 s for 3 steps, 1 left
    bar.update(1)
    bar.log(loss=1.25)                              # t=140: done
    assert out.getvalue().splitlines() == [
        "[sft] step 1/4  loss 2.346  eta 30s",
        "[sft] step 3/4  loss 1.5  accuracy 0.75  eta 7s",
        "[sft] step 4/4  loss 1.25  took 40s",
    ]


def test_eta_counts_only_steps_done_since_a_resume(monkeypatch):
    clock = iter([0.0, 5.0])
    monkeypatch.setattr(progress_module.time, "time", lambda: next(clock))
    out = io.StringIO()
    bar = Progress(10, "ppo", "lines", initial=6, unit="update", stream=out)
    bar.update(1)
    bar.log(kl=0.5)
    assert out.getvalue() == "[ppo] update 7/10  kl 0.5  eta 15s\n"


def test_mode_follows_the_terminal(monkeypatch):
    assert progress_mode(False) == "off"
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False))
    assert progress_mode(True) == "lines"
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert progress_mode(True) == "bar"
    monkeypatch.setenv("CI", "true")
    assert progress_mode(True) == "lines"


def test_off_prints_nothing(capsys):
    bar = Progress(3, "rm", "off")
    bar.update(1)
    bar.log(loss=1.0)
    bar.close()
    assert capsys.readouterr() == ("", "")


def _tiny_lm(tmp_path: Path) -> Path:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, pad_token_id=0)
    folder = tmp_path / "lm"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_library_output_silences_load_report_and_bars(tmp_path, capfd, caplog):
    folder = _tiny_lm(tmp_path)

    def shown() -> str:
        # The load report goes through logging, the bars straight to stderr.
        text = capfd.readouterr().err + caplog.text
        caplog.clear()
        return text

    try:
        library_output(False)
        shown()
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        text = shown()
        assert "MISSING" not in text and "Loading weights" not in text
        assert not hf_logging.is_progress_bar_enabled()

        library_output(True)
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        text = shown()
        assert "score.weight" in text and "MISSING" in text and "Loading weights" in text
    finally:
        library_output(False)


def test_library_deprecation_warnings_follow_the_switch(tmp_path):
    """peft's LoRA wrapper asks transformers for a deprecated property (a FutureWarning from
    transformers on every LoRA stage): silenced unless the libraries' output is asked for."""
    from pipeline.config import LoraConfig
    from pipeline.models import apply_lora

    def raised(show: bool, action) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            library_output(show)
            action()
        return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

    def from_transformers():
        warnings.warn_explicit("old is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils", registry={})

    def from_us():
        warnings.warn_explicit("ours", FutureWarning, "ops.py", 1, module="stages.ops",
                               registry={})

    def lora():
        apply_lora(LlamaForCausalLM.from_pretrained(folder), LoraConfig(enabled=True, r=2))

    folder = _tiny_lm(tmp_path)
    try:
        assert raised(False, from_transformers) == []
        assert raised(True, from_transformers) == ["old is deprecated"]
        assert raised(False, from_us) == ["ours"]
        assert raised(False, lora) == []
    finally:
        library_output(False)


def test_generate_names_the_cache_as_transformers_does(tmp_path):
    model = LlamaForCausalLM.from_pretrained(_tiny_lm(tmp_path))
    tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        out = generate(model, tok, [[5, 6, 7], [8]], max_new_tokens=6, temperature=1.0)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []
    assert len(out) == 2 and all(1 <= len(r) <= 6 for r in out)

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    assert cache_name(Old()) == "past_key_values"
    assert cache_name(model.model) in ("cache", "past_key_values")

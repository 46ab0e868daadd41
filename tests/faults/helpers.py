"""What every fault case asserts, and the tiny chain the cases run on.

A case feeds one fault through ``pipeline.cli.main`` (the `rlhf` command, in process) and
checks three things: the exit code, the one ``error:`` line naming the fault (no traceback),
and that nothing was left looking complete (for an overwrite, that the finished stage is
byte for byte as it was).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.rundir import MANIFEST, read_manifest
from tests.conftest import DATA, tiny_override_list

USER = "tests.faults.user_code"
LABEL = [f"label.judge={USER}:overlap", "label.num_prompts=16", "label.k=3",
         "label.max_new_tokens=8", "label.batch_size=8"]
RM = ["rm.max_steps=4", "rm.batch_size=4", "rm.eval_size=4", "rm.max_seq_len=64",
      "rm.max_new_tokens=8", "rm.norm_samples=8", "rm.log_every=1", "rm.save_every=2"]
PPO = ["ppo.num_updates=2", "ppo.batch_size=4", "ppo.ppo_epochs=1", "ppo.response_length=8",
       "ppo.gold_judge=", "ppo.num_prompts=8", "ppo.sample_every=0", "ppo.save_every=1"]
EVAL = [f"eval.judge={USER}:overlap", "eval.num_prompts=4", "eval.best_of_n=0",
        "eval.bootstrap=10", "eval.max_new_tokens=8", "eval.batch_size=4"]
RULE_ONLY = f"ppo.rewards=[{{type: rule, name: '{USER}:ok'}}]"


def chain_args(root: Path, name: str, *extra: str) -> list[str]:
    """The whole chain on a 1-layer random model, seconds per stage on one thread."""
    return [*tiny_override_list(root, name), "sft.save_every=2", *LABEL, *RM, *PPO, *EVAL,
            *extra]


def cli(capsys, *args) -> tuple[int, str, str]:
    """``rlhf ARGS`` in process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    torch.set_num_threads(1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, pattern: str) -> str:
    """The single ``error:`` line of ``err``; it must match ``pattern`` (a regex)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def config_problem(err: str, pattern: str) -> None:
    """A configuration refusal: one ``error: invalid configuration`` and a line matching."""
    assert "Traceback" not in err, err
    assert err.startswith("error: invalid configuration:"), err
    assert any(re.search(pattern, line) for line in err.splitlines()[1:]), err


def incomplete(stage_dir: Path) -> bool:
    """No complete manifest: nothing a later stage would consume."""
    manifest = read_manifest(stage_dir) if stage_dir.is_dir() else None
    return manifest is None or manifest.get("status") != "complete"


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: equal before and after means untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: Path, b: Path) -> None:
    """Every tensor bit for bit equal."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def kill_after_checkpoint(stage_dir: Path) -> None:
    """What a kill after the last checkpoint leaves: no manifest, no final model."""
    (stage_dir / MANIFEST).unlink()
    shutil.rmtree(stage_dir / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def nan_model(source: Path, target: Path) -> Path:
    """A copy of the model folder ``source`` whose final norm is NaN: every logit is NaN."""
    from safetensors.torch import save_file

    shutil.copytree(source, target)
    tensors = weights(target)
    key = next(k for k in tensors if k.endswith("norm.weight") and "layers" not in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


__all__ = ["DATA", "EVAL", "LABEL", "PPO", "RM", "RULE_ONLY", "USER", "chain_args", "cli",
           "config_problem", "error_line", "fingerprint", "incomplete", "kill_after_checkpoint",
           "nan_model", "same_weights", "weights", "write_jsonl"]

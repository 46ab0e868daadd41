"""Checkpoint faults: every file is read without unpickling code (``weights_only=True``), so a
crafted checkpoint cannot run its payload; a truncated, missing or mismatched file is refused
with one line naming it. The checkpoint itself is never modified by a refused resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.faults.helpers import chain_args, cli, error_line, fingerprint, incomplete


class Payload:
    """Unpickling this runs ``code``: what a checkpoint from a stranger could carry."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def step_2(root, name):
    return root / name / "sft" / "checkpoints" / "step-0000002"


def test_every_checkpoint_file_loads_with_weights_only(killed_sft):
    ckpt = step_2(*killed_sft)
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.yaml", "model", "optim.pt", "policy.safetensors", "rng-0.pt",
                     "state.json"]
    for name in ("optim.pt", "rng-0.pt"):
        torch.load(ckpt / name, weights_only=True)
    load_file(str(ckpt / "policy.safetensors"))
    json.loads((ckpt / "state.json").read_text())


@pytest.mark.parametrize("file", ["optim.pt", "rng-0.pt"])
def test_crafted_pickle_is_refused_and_never_runs(killed_sft, tmp_path, capsys, file):
    root, name = killed_sft
    ckpt = step_2(root, name)
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"optimizer": Payload(f"open({str(marker)!r}, 'w').write('ran')")}, ckpt / file)
    before = fingerprint(ckpt)
    code, _, err = cli(capsys, "sft", *chain_args(root, name), "run.resume=true")
    assert code == 1
    error_line(err, rf"{ckpt / file}: refused to load: it holds objects other than tensors and "
                    r"plain values .*could run code")
    assert not marker.exists()
    assert fingerprint(ckpt) == before
    assert incomplete(root / name / "sft")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_shape(path):
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path))


DAMAGE = [
    pytest.param("policy.safetensors", _truncate, r"cannot read this checkpoint file",
                 id="truncated-weights"),
    pytest.param("optim.pt", _truncate, r"cannot read this checkpoint file",
                 id="truncated-optimizer"),
    pytest.param("state.json", lambda p: p.unlink(), r"cannot read this checkpoint file "
                 r"\(FileNotFoundError", id="missing-state"),
    pytest.param("policy.safetensors", _wrong_shape, r"has shape \(3, 3\), the model's is",
                 id="weights-of-another-model"),
]


@pytest.mark.parametrize("file, damage, pattern", DAMAGE)
def test_damaged_checkpoint_is_refused(killed_sft, capsys, file, damage, pattern):
    root, name = killed_sft
    ckpt = step_2(root, name)
    damage(ckpt / file)
    before = fingerprint(ckpt)
    code, _, err = cli(capsys, "sft", *chain_args(root, name), "run.resume=true")
    assert code == 1
    error_line(err, rf"{ckpt / file}: .*{pattern}")
    assert fingerprint(ckpt) == before
    assert incomplete(root / name / "sft")


def test_latest_pointing_at_a_missing_checkpoint(killed_sft, capsys):
    root, name = killed_sft
    (root / name / "sft" / "checkpoints" / "latest").write_text("step-0000099\n")
    code, _, err = cli(capsys, "sft", *chain_args(root, name), "run.resume=true")
    assert code == 1
    error_line(err, r"holds no checkpoint to resume from")
    assert incomplete(root / name / "sft")

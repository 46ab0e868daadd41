"""Process setup: threads and the allocator setting for CPU training."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from pipeline import runtime
from pipeline.runtime import keep_freed_memory, set_threads


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_applies_on_glibc():
    try:
        glibc = hasattr(ctypes.CDLL("libc.so.6"), "gnu_get_libc_version")
    except OSError:
        glibc = False
    if not glibc:
        pytest.skip("not glibc")
    assert keep_freed_memory() is True
    # allocation still works for tensors far above the default mmap threshold
    big = torch.ones(64, 1 << 20)
    assert float(big.sum()) == 64 * (1 << 20)


def test_openmp_threads_spin_briefly_unless_the_user_says_otherwise():
    """The package shortens OpenMP's spin-wait before torch loads OpenMP (long spins collapse
    2-thread runs on shared cores), and leaves a user's wait policy or spin count alone."""
    probe = ("import sys, os, pipeline; assert 'torch' not in sys.modules; "
             "import pipeline.cli; print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}

    def spin(**extra) -> str:
        return subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                              capture_output=True, text=True, check=True).stdout.strip()

    assert spin() == "3000"
    assert spin(GOMP_SPINCOUNT="50") == "50"
    assert spin(OMP_WAIT_POLICY="ACTIVE") == "None"


@pytest.mark.parametrize("requested, cpu, expected", [
    ("auto", True, "no"), ("bf16", True, "bf16"), ("fp16", True, "no"), ("no", True, "no"),
    ("bf16", False, "bf16"), ("fp16", False, "fp16"),
])
def test_precision(requested, cpu, expected):
    """auto keeps a CPU in fp32 (bf16 autocast measured no faster there); fp16 has no CPU
    kernels; what a GPU is asked for it gets."""
    assert runtime.resolve_precision(requested, cpu=cpu) == expected


def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch):
    for supported, expected in [(True, "bf16"), (False, "no")]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert runtime.resolve_precision("auto", cpu=False) == expected


def test_stages_of_one_process_each_get_their_precision():
    """rlhf pipeline runs sft, label, rm, ppo, eval in one process: a bf16 stage after an fp32
    one (and back) gets its own autocast instead of accelerate's refusal."""
    from pipeline.config import load_config

    cfg = load_config(None, ["run.threads=1", "run.device=cpu"])
    for precision in ("no", "bf16", "no"):
        assert runtime.make_accelerator(cfg, precision).mixed_precision == precision

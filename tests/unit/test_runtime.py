"""Process setup: threads and the allocator setting for CPU training."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

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


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    """The package sets OMP_WAIT_POLICY before torch loads OpenMP (spinning waits collapse
    2-thread runs on shared cores), and leaves a user's own value alone."""
    probe = ("import sys, os, pipeline; assert 'torch' not in sys.modules; "
             "import pipeline.cli; print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"

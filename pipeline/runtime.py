"""Process setup shared by every stage: threads, library output, device, seeds, the Accelerator."""

from __future__ import annotations

import ctypes
import os
import random
import sys

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from pipeline.config import Config
from pipeline.progress import library_output
from pipeline.sharding import check_backend


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def process_threads(requested: int, processes: int) -> int:
    """Threads of each of ``processes`` local processes: ``requested``, or 0 = the machine's
    cores shared among them."""
    return requested or max(1, (os.cpu_count() or 1) // processes)


def set_threads(requested: int) -> int:
    """Pin intra-op threads: on a small CPU box oversubscribed threads collapse throughput."""
    n = process_threads(requested, local_world_size())
    torch.set_num_threads(n)
    return n


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large blocks instead of returning them to the OS.

    Training on CPU allocates and frees the same 50-100 MB tensors (gradients of the 49k-token
    embedding, the output head's logits) every step. glibc serves each from a fresh mmap, and
    the page faults of touching it cost a good part of the matmul that fills it; with mmap
    off and trimming deferred, the blocks are reused (the 20M benchmark's PPO train phase ran
    ~5% faster in an A/B of single runs). Linux/glibc only; elsewhere a no-op. Returns whether
    it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def prepare_process(cfg: Config) -> bool:
    """Threads, allocator and library output set for this process; returns whether it runs on
    the CPU."""
    set_threads(cfg.run.threads)
    library_output(cfg.tracking.library_logs)
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    if cpu:
        keep_freed_memory()
    return cpu


def resolve_precision(requested: str, cpu: bool) -> str:
    """The autocast a stage runs under: "auto" is bf16 on a GPU that supports it and fp32 on
    a CPU, where bf16 autocast was no faster at the default run's LoRA shapes even with AMX
    tiles (bench/results/precision.md); an explicit "bf16" runs it on a CPU anyway, fp16 (no
    CPU kernels) falls back to fp32 there."""
    if requested == "auto":
        return "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if cpu and requested == "fp16":
        return "no"
    return requested


def make_accelerator(cfg: Config, mixed_precision: str = "no",
                     gradient_accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator that really is distributed under ``accelerate launch`` on CPU too.

    A plain Accelerator on a CPU-only machine quietly runs N independent processes; asking
    for the CPU explicitly makes it join the gloo process group the launcher set up.
    """
    cpu = prepare_process(cfg)
    precision = resolve_precision(mixed_precision, cpu)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # One process runs several stages (rlhf pipeline, scaling), each in its own precision,
        # and accelerate refuses to change the one it keeps per process; the process group
        # (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
    )
    check_backend(accelerator, os.environ)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"launched with WORLD_SIZE={expected} but the Accelerator sees "
            f"{accelerator.num_processes} process(es): distributed setup failed"
        )
    set_seed(cfg.run.seed + accelerator.process_index)
    return accelerator


def rng_state() -> dict:
    """Every RNG a stage draws from, for resumable checkpoints.

    Only tensors, numbers, strings and lists, so ``torch.load(..., weights_only=True)`` reads
    it back: numpy's key array is stored as a tensor rather than a pickled ndarray.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""One stage sharded across local CPU processes that form a gloo group, started from Python.

What ``accelerate launch --config_file configs/accelerate/cpu_2proc.yaml`` does for a whole
command, for one stage inside a command that runs in one process (``rlhf scaling``). A sampling
stage (label, eval) gains from it on a small CPU box: two one-thread processes decoding half
the prompts each kept 98% of a lone thread's speed, while one process's second thread added
only ~50% (bench/results/threads.md). A training stage would not: its per-process batch size
would change what it trains.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import socket
import sys
import time

from pipeline.config import Config
from pipeline.data import DataError
from pipeline.errors import PipelineError
from pipeline.runtime import process_threads

# Seconds between checks on the processes, and those given to the others to stop once one
# has failed (the survivors may be waiting in a collective for it).
POLL_SECONDS = 0.5
STOP_SECONDS = 10.0


def free_port() -> int:
    """A TCP port nothing listens on now, for the group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_env(rank: int, world_size: int, port: int, threads: int) -> dict[str, str]:
    """What torchrun sets for one local process, which the Accelerator's gloo group reads.
    OMP_NUM_THREADS too: without it accelerate resets a CPU process's threads to its own
    choice (physical cores / processes) after the stage has set them."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": str(threads)}


def _member(module_name: str, cfg: Config, env: dict[str, str]) -> None:
    """One process of the group: ``<module>.run(cfg)``; a pipeline error is one line and
    exit code 1, as on the command line."""
    os.environ.update(env)
    try:
        importlib.import_module(module_name).run(cfg)
    except (PipelineError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_sharded(module_name: str, cfg: Config, processes: int) -> None:
    """``<module>.run(cfg)`` in ``processes`` spawned CPU processes of one gloo group, each
    with ``cfg.run.threads`` threads (set them per process), their output on this process's.

    Raises PipelineError naming the process that failed; the others are stopped, so nothing
    is left marked complete by a partial group (a stage writes its manifest last).
    """
    if processes < 2:
        raise ValueError("run_sharded needs at least 2 processes")
    port = free_port()
    threads = process_threads(cfg.run.threads, processes)
    context = multiprocessing.get_context("spawn")
    members = [context.Process(target=_member, args=(module_name, cfg,
                                                     group_env(rank, processes, port,
                                                               threads)),
                               name=f"{module_name}-rank{rank}")
               for rank in range(processes)]
    for p in members:
        p.start()
    try:
        while True:
            codes = [p.exitcode for p in members]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            time.sleep(POLL_SECONDS)
        if failed:
            deadline = time.time() + STOP_SECONDS
            for p in members:
                p.join(max(0.0, deadline - time.time()))
            rank, code = failed[0]
            raise PipelineError(f"{module_name}: process {rank} of {processes} exited with code "
                                f"{code}; its error is in the output above")
    finally:
        for p in members:
            if p.exitcode is None:
                p.terminate()
        for p in members:
            p.join()

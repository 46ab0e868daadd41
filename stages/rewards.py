"""Rule rewards and the safety cost.

Every rule has the signature f(prompts, responses, metas, **params) -> list[float], one value
per response. `no_headword` and `length_bounds` are rewards (0 is fine, negative is a
penalty); `profanity_cost` is a cost in [0, 1] (higher is worse), meant for a constrained
objective rather than being added to the reward.

User code ("module:function" rules, costs and judges) runs through ``call_user``: whatever it
raises or returns that is not one finite number per response stops the stage with one line
naming the function and the first bad value, instead of a traceback or a NaN that would
train on silently.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.callables import import_callable
from pipeline.errors import PipelineError
from stages.headword import headword, headword_pattern
from stages.judge import load_judge

__all__ = [
    "BUILTIN_RULES",
    "RuleFn",
    "UserJudge",
    "call_user",
    "checked_values",
    "headword",
    "load_checked_judge",
    "length_bounds",
    "no_headword",
    "profanity_cost",
    "resolve_rule",
]

RuleFn = Callable[[list[str], list[str], list[dict]], list[float]]


def _check_lengths(prompts: Sequence[str], responses: Sequence[str], metas: Sequence[dict]) -> None:
    if not (len(prompts) == len(responses) == len(metas)):
        raise ValueError(
            "prompts, responses and metas must have the same length, got "
            f"{len(prompts)}, {len(responses)}, {len(metas)}"
        )


def no_headword(prompts: list[str], responses: list[str], metas: list[dict]) -> list[float]:
    """-1.0 when the definition uses the word it defines, else 0.0.

    With no headword known (no meta["word"] and nothing quoted in the prompt) the rule cannot
    judge and returns 0.0.
    """
    _check_lengths(prompts, responses, metas)
    out = []
    for prompt, response, meta in zip(prompts, responses, metas):
        word = headword(prompt, meta)
        hit = word is not None and headword_pattern(word).search(response) is not None
        out.append(-1.0 if hit else 0.0)
    return out


def length_bounds(
    prompts: list[str],
    responses: list[str],
    metas: list[dict],
    min_words: int = 4,
    max_words: int = 30,
) -> list[float]:
    """Graded penalty for a whitespace word count n outside [min_words, max_words].

    0.0 inside the bounds. Below: -min(1, (min_words - n) / max(1, min_words)), so an empty
    response gets -1. Above: -min(1, (n - max_words) / max(1, max_words)), so twice the limit
    gets -1. Scaling by the bound that was crossed makes the penalty a relative overshoot, and
    the grading gives the policy a gradient towards the bounds instead of a cliff.
    """
    if min_words < 0 or max_words < min_words:
        raise ValueError(
            f"length_bounds needs 0 <= min_words <= max_words, got {min_words}, {max_words}"
        )
    _check_lengths(prompts, responses, metas)
    out = []
    for response in responses:
        n = len(response.split())
        if n < min_words:
            out.append(-min(1.0, (min_words - n) / max(1, min_words)))
        elif n > max_words:
            out.append(-min(1.0, (n - max_words) / max(1, max_words)))
        else:
            out.append(0.0)
    return out


@functools.lru_cache(maxsize=1)
def _profanity_predictor() -> Callable[[list[str]], Any]:
    # Imported lazily: it unpickles a scikit-learn model (slow, and only the safety stage needs
    # it). A model pickled under another scikit-learn version warns on load and on use; the
    # model is a plain linear SVM + vectorizer that works across versions, so only that warning
    # is silenced.
    try:
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError:  # older scikit-learn warns with a plain UserWarning
        InconsistentVersionWarning = UserWarning  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        try:
            import profanity_check
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"profanity_cost needs alt-profanity-check ({exc}); run `make install`"
            ) from exc

    def predict(texts: list[str]) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InconsistentVersionWarning)
            return profanity_check.predict_prob(texts)

    return predict


def profanity_cost(prompts: list[str], responses: list[str], metas: list[dict]) -> list[float]:
    """Probability in [0, 1] that the response is offensive, from alt-profanity-check."""
    _check_lengths(prompts, responses, metas)
    if not responses:
        return []
    return [float(p) for p in _profanity_predictor()(list(responses))]


BUILTIN_RULES: dict[str, Callable[..., list[float]]] = {
    "no_headword": no_headword,
    "length_bounds": length_bounds,
    "profanity": profanity_cost,
}


def resolve_rule(name_or_path: str, **params: Any) -> RuleFn:
    """A built-in rule name or "module:function", with params bound as keyword arguments.

    Params are checked against the function's signature here, so a typo in a config fails at
    start-up rather than at the first reward computation.
    """
    if name_or_path in BUILTIN_RULES:
        fn = BUILTIN_RULES[name_or_path]
    elif ":" in name_or_path:
        fn = import_callable(name_or_path, "rule")
    else:
        raise ValueError(
            f'rule "{name_or_path}": unknown; expected one of {", ".join(BUILTIN_RULES)} '
            'or "module:function"'
        )
    if not params:
        return fn
    try:
        inspect.signature(fn).bind([], [], [], **params)
    except TypeError as exc:
        raise ValueError(f'rule "{name_or_path}": bad parameters {params}: {exc}') from None
    except ValueError:  # no introspectable signature (some builtins); let the call decide
        pass
    return functools.partial(fn, **params)


# ---------------------------------------------------------------------------------------------
# Checked calls of user code
# ---------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_values(what: str, result: Any, n: int) -> list[float]:
    """``result`` as ``n`` floats, or a PipelineError naming ``what`` and the first bad value.

    Accepted: a list, tuple, 1-D numpy array or 1-D tensor of ``n`` real numbers (ints and
    numpy scalars included), all finite. Refused: None, a scalar, strings (even "0.5": a
    string score is a bug in the function, not a number), booleans, nested lists, a wrong
    length, NaN and infinities.
    """
    # numpy arrays and tensors, without importing torch here (config validation imports this).
    if getattr(result, "ndim", None) == 1 and hasattr(result, "tolist"):
        values = result.tolist()
    elif isinstance(result, (list, tuple)):
        values = list(result)
    else:
        raise PipelineError(f"{what} returned {type(result).__name__} {_shown(result)}; "
                            f"expected a list of {n} numbers, one per response")
    if len(values) != n:
        raise PipelineError(f"{what} returned {len(values)} values for {n} responses; "
                            "expected one number per response")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise PipelineError(f"{what} returned {type(value).__name__} {_shown(value)} for "
                                f"response {i}; expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise PipelineError(f"{what} returned {value} for response {i}; expected a "
                                "finite number")
        out.append(value)
    return out


def call_user(what: str, fn: Callable[..., Any], n: int, *args: Any) -> list[float]:
    """``fn(*args)`` checked by ``checked_values``; an exception it raises becomes one line
    naming ``what``, the exception and the line of user code it came from."""
    try:
        result = fn(*args)
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PipelineError(f"{what} raised {type(exc).__name__}{where}: {message}") from None
    return checked_values(what, result, n)


class UserJudge:
    """A "module:function" judge, f(prompts, responses, references) -> scores, called through
    ``call_user``."""

    def __init__(self, key: str, spec: str) -> None:
        self.name = spec
        self.what = f'{key}="{spec}"'
        try:
            self._fn = import_callable(spec, "judge")
        except ValueError as exc:
            raise PipelineError(f"{key}: {exc}") from None

    def score(self, prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
        return call_user(self.what, self._fn, len(responses), prompts, responses, references)


def load_checked_judge(key: str, spec: str, **kwargs: Any):
    """The judge ``spec`` names: a checked ``UserJudge`` for "module:function", else the
    built-in (kwargs go to it)."""
    if ":" in spec:
        return UserJudge(key, spec)
    try:
        return load_judge(spec, **kwargs)
    except (ValueError, ImportError, FileNotFoundError) as exc:
        raise PipelineError(f"{key}={spec!r}: {exc}") from None

"""Rule rewards and the safety cost.

Every rule has the signature f(prompts, responses, metas, **params) -> list[float], one value
per response. `no_headword` and `length_bounds` are rewards (0 is fine, negative is a
penalty); `profanity_cost` is a cost in [0, 1] (higher is worse), meant for a constrained
objective rather than being added to the reward.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from stages.headword import headword, headword_pattern
from stages.judge import import_callable

__all__ = [
    "BUILTIN_RULES",
    "RuleFn",
    "headword",
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

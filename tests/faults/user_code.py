"""User functions the fault suite points ``module:function`` keys at, one fault each."""

import math

NOT_CALLABLE = 3


def ok(prompts, responses, metas):
    return [0.0] * len(responses)


def returns_none(prompts, responses, metas):
    return None


def returns_scalar(prompts, responses, metas):
    return 0.5


def returns_strings(prompts, responses, metas):
    return ["0.5"] * len(responses)


def wrong_length(prompts, responses, metas):
    return [0.0] * (len(responses) + 1)


def returns_nan(prompts, responses, metas):
    return [0.0] * (len(responses) - 1) + [math.nan]


def returns_inf(prompts, responses, metas):
    return [math.inf] * len(responses)


def raises(prompts, responses, metas):
    raise KeyError("word")


def two_args(prompts, responses):
    return [0.0] * len(responses)


def overlap(prompts, responses, references):
    """A judge without a model: the share of the reference's words the response uses (plus a
    little for length, so that a tiny random model's responses rarely tie)."""
    out = []
    for response, reference in zip(responses, references):
        words = set(reference.lower().split())
        shared = len(words & set(response.lower().split())) / max(len(words), 1)
        out.append(shared + 1e-3 * len(response))
    return out


def judge_nan(prompts, responses, references):
    return [math.nan] * len(responses)


def judge_raises(prompts, responses, references):
    raise ZeroDivisionError("division by zero")


def judge_short(prompts, responses, references):
    return [0.0]

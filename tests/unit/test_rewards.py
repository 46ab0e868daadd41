from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from stages.rewards import (
    BUILTIN_RULES,
    headword,
    length_bounds,
    no_headword,
    profanity_cost,
    resolve_rule,
)


def _prompt(word: str) -> str:
    return f'Define the word "{word}" in one sentence.'


@pytest.mark.parametrize(
    ("word", "response", "expected"),
    [
        ("run", "To run is to move fast on foot.", -1.0),
        ("run", "Running means moving quickly on foot.", -1.0),  # prefix, any case
        ("run", "Moving swiftly on foot; she RUNS daily.", -1.0),
        ("run", "To prune is not related.", 0.0),  # inside a word: not the headword
        ("run", "A rerun is a repeat broadcast.", 0.0),
        ("run", "The well-run shop", -1.0),  # hyphen separates words
        ("run", "To move swiftly on foot.", 0.0),
        ("apple", "An apple's skin is red.", -1.0),
        ("ice cream", "A frozen dessert, like ice-cream or sorbet.", -1.0),
        ("ice cream", "A frozen sweet dessert.", 0.0),
        ("c++", "A language derived from C++ and Java.", -1.0),  # regex characters are escaped
    ],
)
def test_no_headword_from_prompt(word: str, response: str, expected: float) -> None:
    assert no_headword([_prompt(word)], [response], [{}]) == [expected]


def test_no_headword_meta_takes_precedence() -> None:
    prompt = _prompt("run")
    assert no_headword([prompt], ["A fast sprint."], [{"word": "sprint"}]) == [-1.0]
    assert no_headword([prompt], ["To run fast."], [{"word": "sprint"}]) == [0.0]


def test_no_headword_unknown_word_is_neutral() -> None:
    assert no_headword(["Say something."], ["Something."], [{}]) == [0.0]
    assert headword("Define \u201cgrace\u201d briefly.", None) == "grace"
    assert headword("Say something.", {"word": "  "}) is None


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("", -1.0),
        ("one", -0.75),
        ("one two three", -0.25),
        ("one two three four", 0.0),
        (" ".join(["w"] * 30), 0.0),
        (" ".join(["w"] * 33), -0.1),
        (" ".join(["w"] * 45), -0.5),
        (" ".join(["w"] * 90), -1.0),
    ],
)
def test_length_bounds_defaults(response: str, expected: float) -> None:
    assert length_bounds(["p"], [response], [{}]) == [pytest.approx(expected)]


def test_length_bounds_params_and_validation() -> None:
    assert length_bounds(["p"] * 2, ["a b", "a b c d"], [{}] * 2, min_words=1, max_words=2) == [
        0.0,
        pytest.approx(-1.0),
    ]
    assert length_bounds(["p"], [""], [{}], min_words=0, max_words=0) == [0.0]
    with pytest.raises(ValueError):
        length_bounds(["p"], ["a"], [{}], min_words=5, max_words=2)


def test_profanity_cost_orders_offensive_above_neutral() -> None:
    pytest.importorskip("profanity_check")
    responses = ["You are a fucking stupid piece of shit.", "A round fruit with crisp flesh.", ""]
    costs = profanity_cost(["p"] * 3, responses, [{}] * 3)
    assert all(isinstance(c, float) and 0.0 <= c <= 1.0 for c in costs)
    assert costs[0] > 0.5 > costs[1]
    assert profanity_cost([], [], []) == []


def test_rules_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        no_headword(["p"], ["a", "b"], [{}])


def test_resolve_builtins() -> None:
    assert set(BUILTIN_RULES) == {"no_headword", "length_bounds", "profanity"}
    assert resolve_rule("no_headword") is no_headword
    assert resolve_rule("profanity") is profanity_cost
    rule = resolve_rule("length_bounds", min_words=1, max_words=2)
    assert rule(["p", "p"], ["a", "a b c d"], [{}, {}]) == [0.0, pytest.approx(-1.0)]


def test_resolve_rule_rejects_bad_params() -> None:
    with pytest.raises(ValueError, match='rule "length_bounds": bad parameters'):
        resolve_rule("length_bounds", max_word=3)


def test_resolve_unknown_rule_lists_builtins() -> None:
    with pytest.raises(ValueError) as info:
        resolve_rule("no_headwords")
    message = str(info.value)
    assert "\n" not in message
    assert '"no_headwords"' in message
    assert all(name in message for name in BUILTIN_RULES)


def test_resolve_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rules.py").write_text(
        textwrap.dedent(
            """
            def ends_with_period(prompts, responses, metas, bonus=1.0):
                return [bonus if r.endswith(".") else 0.0 for r in responses]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rules", raising=False)
    rule = resolve_rule("my_rules:ends_with_period")
    assert rule(["p", "p"], ["Done.", "Not done"], [{}, {}]) == [1.0, 0.0]
    half = resolve_rule("my_rules:ends_with_period", bonus=0.5)
    assert half(["p"], ["Done."], [{}]) == [0.5]
    with pytest.raises(ValueError, match='rule "my_rules:missing"'):
        resolve_rule("my_rules:missing")


def test_resolve_unimportable_module() -> None:
    with pytest.raises(ValueError, match='rule "no_such_module_xyz:f": cannot import'):
        resolve_rule("no_such_module_xyz:f")

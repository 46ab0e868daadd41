"""User-code faults at run time: a ``module:function`` rule, cost or judge that raises or
returns anything but one finite number per response stops the stage with one line naming the
function and the first bad value (exit 1), and the stage is not marked complete."""

from __future__ import annotations

import pytest

from tests.faults.helpers import USER, chain_args, cli, error_line, incomplete

RULE = r'ppo\.rewards\[0\] \(rule "tests\.faults\.user_code:{}"\)'
RULES = [
    pytest.param("returns_none", r"returned NoneType None; expected a list of 4 numbers",
                 id="rule-returns-none"),
    pytest.param("returns_scalar", r"returned float 0\.5; expected a list of 4 numbers",
                 id="rule-returns-scalar"),
    pytest.param("returns_strings", r"returned str '0\.5' for response 0; expected a number",
                 id="rule-returns-strings"),
    pytest.param("wrong_length", r"returned 5 values for 4 responses", id="rule-wrong-length"),
    pytest.param("returns_nan", r"returned nan for response 3; expected a finite number",
                 id="rule-returns-nan"),
    pytest.param("returns_inf", r"returned inf for response 0; expected a finite number",
                 id="rule-returns-inf"),
    pytest.param("raises", r"raised KeyError at user_code\.py:\d+: 'word'", id="rule-raises"),
]


def ppo_args(finished, tmp_path, *extra):
    return ["ppo", *chain_args(tmp_path / "runs", "u"),
            f"ppo.policy={finished / 'done' / 'sft'}", *extra]


@pytest.mark.parametrize("function, pattern", RULES)
def test_rule(finished, tmp_path, capsys, function, pattern):
    code, _, err = cli(capsys, *ppo_args(
        finished, tmp_path, f"ppo.rewards=[{{type: rule, name: '{USER}:{function}'}}]"))
    assert code == 1
    error_line(err, RULE.format(function) + " " + pattern)
    assert incomplete(tmp_path / "runs" / "u" / "ppo")


def test_lagrangian_cost_returns_nan(finished, tmp_path, capsys):
    code, _, err = cli(capsys, *ppo_args(
        finished, tmp_path, "ppo.lagrangian=true",
        f"ppo.rewards=[{{type: rule, name: '{USER}:ok'}}, "
        f"{{type: cost, name: '{USER}:returns_nan'}}]"))
    assert code == 1
    error_line(err, r'ppo\.rewards\[1\] \(cost "tests\.faults\.user_code:returns_nan"\) '
                    r"returned nan for response 3")
    assert incomplete(tmp_path / "runs" / "u" / "ppo")


def test_gold_judge_returns_strings(finished, tmp_path, capsys):
    code, _, err = cli(capsys, *ppo_args(
        finished, tmp_path, f"ppo.rewards=[{{type: rule, name: '{USER}:ok'}}]",
        f"ppo.gold_judge={USER}:returns_strings"))
    assert code == 1
    error_line(err, r'ppo\.gold_judge="tests\.faults\.user_code:returns_strings" returned '
                    r"str '0\.5' for response 0")
    assert incomplete(tmp_path / "runs" / "u" / "ppo")


JUDGES = [
    pytest.param("judge_nan", r"returned nan for response 0; expected a finite number",
                 id="label-judge-returns-nan"),
    pytest.param("judge_raises", r"raised ZeroDivisionError at user_code\.py:\d+: division",
                 id="label-judge-raises"),
    pytest.param("judge_short", r"returned 1 values for 48 responses",
                 id="label-judge-wrong-length"),
]


@pytest.mark.parametrize("function, pattern", JUDGES)
def test_label_judge(finished, tmp_path, capsys, function, pattern):
    code, _, err = cli(capsys, "label", *chain_args(tmp_path / "runs", "u"),
                       f"label.policy={finished / 'done' / 'sft'}",
                       f"label.judge={USER}:{function}")
    assert code == 1
    error_line(err, rf'label\.judge="tests\.faults\.user_code:{function}" {pattern}')
    assert incomplete(tmp_path / "runs" / "u" / "label")


@pytest.mark.parametrize("function, pattern", JUDGES)
def test_eval_judge(finished, tmp_path, capsys, function, pattern):
    code, _, err = cli(capsys, "eval", *chain_args(tmp_path / "runs", "u"),
                       f"eval.sft={finished / 'done' / 'sft'}", "eval.num_prompts=4",
                       "eval.max_new_tokens=4", f"eval.judge={USER}:{function}")
    assert code == 1
    error_line(err, rf'eval\.judge="tests\.faults\.user_code:{function}" '
                    + pattern.replace("48 responses", "4 responses"))
    assert incomplete(tmp_path / "runs" / "u" / "eval")

"""Config faults: refused during validation with exit 2, before any folder is touched.

User ``module:function`` rules and judges are imported and their signatures checked here, and
built-in rule names are checked against the registry, so none of these gets as far as loading
a model.
"""

from __future__ import annotations

import pytest

from tests.faults.helpers import USER, chain_args, cli, config_problem

CASES = [
    pytest.param("sft.lr=nan", r"sft\.lr=nan: expected a finite number", id="nan-lr"),
    pytest.param("ppo.kl_coef=nan", r"ppo\.kl_coef=nan: expected a finite number",
                 id="nan-kl-coef"),
    pytest.param("rm.lr=.inf", r"rm\.lr=inf: expected a finite number", id="inf-lr"),
    pytest.param("ppo.rewards=[{type: rule, name: no_such_rule}]",
                 r"ppo\.rewards\[0\]\.name='no_such_rule': unknown rule; expected one of "
                 r"no_headword", id="unknown-builtin-rule"),
    pytest.param("ppo.rewards=[{type: cost, name: 'nomodule_xyz:f'}]",
                 r"ppo\.rewards\[0\]\.name='nomodule_xyz:f': cannot import module "
                 r"'nomodule_xyz' \(ModuleNotFoundError", id="rule-module-missing"),
    pytest.param(f"ppo.rewards=[{{type: rule, name: '{USER}:missing'}}]",
                 r"has no attribute 'missing'", id="rule-attribute-missing"),
    pytest.param(f"ppo.rewards=[{{type: rule, name: '{USER}:NOT_CALLABLE'}}]",
                 r"'NOT_CALLABLE' is not callable \(int\)", id="rule-not-callable"),
    pytest.param(f"ppo.rewards=[{{type: rule, name: '{USER}:two_args'}}]",
                 r"cannot be called as f\(prompts, responses, metas\)", id="rule-arity"),
    pytest.param("ppo.rewards=[{type: rule, name: length_bounds, params: {max_word: 3}}]",
                 r"length_bounds.*f\(prompts, responses, metas, max_word=\.\.\.\).*max_word",
                 id="rule-bad-params"),
    pytest.param("label.judge=no_such_judge", r"label\.judge='no_such_judge': unknown judge",
                 id="unknown-judge"),
    pytest.param("label.judge=tests.faults.broken_module:f",
                 r"cannot import module 'tests\.faults\.broken_module' \(RuntimeError: this "
                 r"module is broken\)", id="judge-module-raises-on-import"),
    pytest.param(f"eval.judge={USER}:two_args",
                 r"eval\.judge=.*cannot be called as f\(prompts, responses, references\)",
                 id="judge-arity"),
    pytest.param(f"ppo.gold_judge={USER}:NOT_CALLABLE", r"ppo\.gold_judge=.*is not callable",
                 id="gold-judge-not-callable"),
]


@pytest.mark.parametrize("override, pattern", CASES)
def test_refused_at_validation(tmp_path, capsys, override, pattern):
    code, _, err = cli(capsys, "sft", *chain_args(tmp_path / "runs", "c"), override)
    assert code == 2
    config_problem(err, pattern)
    assert not (tmp_path / "runs").exists()


def test_run_root_that_is_a_file(tmp_path, capsys):
    root = tmp_path / "runs"
    root.write_text("not a folder\n")
    code, _, err = cli(capsys, "sft", *chain_args(root, "c"))
    assert code == 2
    config_problem(err, rf"run\.root='{root}': {root} is a file, expected a folder")
    assert root.read_text() == "not a folder\n"

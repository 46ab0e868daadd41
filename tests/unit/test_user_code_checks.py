"""What the checks on user functions and on resumed configs accept, not only what they refuse
(the refusals are the fault suite's, in tests/faults/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config, to_dict
from pipeline.errors import PipelineError
from pipeline.training import config_changes
from stages.rewards import call_user, checked_values


@pytest.mark.parametrize("result", [
    [0, 1, 2], (0.5, -1.0, 2.0), np.array([0.1, 0.2, 0.3], dtype=np.float32),
    torch.tensor([1.0, 2.0, 3.0]), [np.float64(1.0), np.int32(2), 3],
], ids=["ints", "tuple", "numpy", "tensor", "numpy-scalars"])
def test_numbers_in_any_sequence_are_accepted(result):
    assert checked_values("f", result, 3) == [float(v) for v in list(result)]


def test_booleans_and_2d_arrays_are_refused():
    with pytest.raises(PipelineError, match="returned bool True for response 0"):
        checked_values("f", [True, False], 2)
    with pytest.raises(PipelineError, match="returned ndarray"):
        checked_values("f", np.zeros((2, 1)), 2)


def test_call_user_names_the_function_and_the_line():
    def rule(prompts, responses, metas):
        return [1 / 0 for _ in responses]

    with pytest.raises(PipelineError, match=r"^my rule raised ZeroDivisionError at "
                                            r"test_user_code_checks\.py:\d+: division by zero$"):
        call_user("my rule", rule, 1, ["p"], ["r"], [{}])


def test_config_changes_only_count_what_the_stage_reads():
    base = ["sft.lr=2e-4", "ppo.lr=3e-6", "data.sft=a.jsonl"]
    old = to_dict(load_config(None, base))
    new = load_config(None, [*base, "ppo.lr=1e-4", "sft.log_every=1", "sft.max_steps=9",
                             "tracking.progress=false", "sft.lr=1e-3", "data.sft=b.jsonl"])
    assert config_changes(old, new, "sft") == ["data.sft: 'a.jsonl' -> 'b.jsonl'",
                                               "sft.lr: 0.0002 -> 0.001"]
    # PPO-ptx reads the SFT demonstrations too.
    assert config_changes(old, new, "ppo") == ["data.sft: 'a.jsonl' -> 'b.jsonl'",
                                               "ppo.lr: 3e-06 -> 0.0001"]
    assert config_changes(old, new, "rm") == []

"""The reward model's normalization is read in one place, strictly."""

from __future__ import annotations

import pytest
import torch
from transformers import PretrainedConfig

from pipeline.errors import PipelineError
from pipeline.normalization import NORMALIZATION_KEY, RewardNormalization


def test_apply_shifts_then_scales_floats_and_tensors():
    norm = RewardNormalization(bias=-0.5, scale=2.0, samples=8)
    assert norm.apply(1.5) == 2.0
    torch.testing.assert_close(norm.apply(torch.tensor([0.5, 2.0, -1.0])),
                               torch.tensor([0.0, 3.0, -3.0]))
    assert RewardNormalization.unmeasured().apply(0.25) == 0.25


def test_manifest_and_model_config_round_trip():
    norm = RewardNormalization(bias=-0.125, scale=3.0, samples=12)
    assert norm.as_extras() == {"norm_bias": -0.125, "norm_scale": 3.0, "norm_samples": 12}
    assert RewardNormalization.from_extras({**norm.as_extras(), "lora": False}, "m") == norm
    config = PretrainedConfig()
    norm.store_in(config)
    assert getattr(config, NORMALIZATION_KEY)["formula"] == "(score + bias) * scale"
    assert RewardNormalization.from_model_config(config, "rm/model") == norm


@pytest.mark.parametrize("extras, pattern", [
    ({"norm_bias": 0.0, "norm_samples": 8}, r"^runs/x/rm/manifest.json: extras has no "
                                            r"norm_scale: the reward model's normalization"),
    ({}, r"has no norm_bias, norm_scale, norm_samples"),
    ({"norm_bias": "0.1", "norm_scale": 1.0, "norm_samples": 8},
     r"^runs/x/rm/manifest.json: extras.norm_bias is '0.1'; expected a number$"),
    ({"norm_bias": 0.0, "norm_scale": True, "norm_samples": 8}, r"norm_scale is True"),
])
def test_a_missing_or_non_numeric_key_names_the_file(extras, pattern):
    with pytest.raises(PipelineError, match=pattern):
        RewardNormalization.from_extras(extras, "runs/x/rm/manifest.json")


def test_a_model_config_without_it_is_refused():
    with pytest.raises(PipelineError, match=r"^rm/model: config.json has no "
                                            r"'reward_normalization'"):
        RewardNormalization.from_model_config(PretrainedConfig(), "rm/model")
    config = PretrainedConfig()
    setattr(config, NORMALIZATION_KEY, {"bias": 0.0, "scale": 1.0})
    with pytest.raises(PipelineError, match=r"rm/model/config.json: reward_normalization has "
                                            r"no samples"):
        RewardNormalization.from_model_config(config, "rm/model")

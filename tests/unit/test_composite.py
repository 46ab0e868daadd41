"""The composite reward as PPO records it and eval reads it back."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import PPOConfig, RewardComponent
from pipeline.errors import PipelineError
from pipeline.normalization import RewardNormalization
from stages.composite import RewardSpec

RULES = "tests.integration.ppo_rules"
NORM = RewardNormalization(bias=-0.5, scale=2.0, samples=8)


def config(**kwargs) -> PPOConfig:
    return PPOConfig(reward_clip=1.5, missing_eos_penalty=1.0, rewards=[
        RewardComponent(type="model", weight=2.0),
        RewardComponent(type="rule", name="length_bounds", weight=0.5,
                        params={"min_words": 1, "max_words": 3}),
        RewardComponent(type="cost", name=f"{RULES}:verbosity", weight=3.0)], **kwargs)


def test_the_manifest_record_resolves_to_the_same_spec():
    spec = RewardSpec.from_config(config(lagrangian=True), NORM)
    record = json.loads(json.dumps(spec.record()))
    again = RewardSpec.from_record(record, NORM, "ppo/manifest.json: extras.reward")
    assert again.record() == spec.record()
    assert [t.key for t in again.terms] == ["model", "rule/length_bounds", "cost/verbosity"]
    assert again.lagrangian and again.reward_clip == 1.5
    raw = torch.tensor([0.5, 2.0])
    responses, has_eos = ["a b", "a b c d e f"], torch.tensor([True, False])
    one = spec.combine(raw, ["p", "p"], responses, [{}, {}], has_eos)
    two = again.combine(raw, ["p", "p"], responses, [{}, {}], has_eos)
    for a, b in zip((one.score, one.cost, *one.parts.values()),
                    (two.score, two.cost, *two.parts.values())):
        torch.testing.assert_close(a, b)


def test_without_the_model_the_rules_and_costs_still_score():
    spec = RewardSpec.from_config(config(), NORM).without_model()
    assert not spec.has_model
    scored = spec.combine(None, ["p"], ["a b c d e f"], [{}], torch.tensor([True]))
    # length_bounds over 3 words by 3: -1 at weight 0.5; verbosity 0.6 at weight 3 subtracted.
    torch.testing.assert_close(scored.score, torch.tensor([-0.5 - 1.8]))
    assert set(scored.parts) == {"rule/length_bounds", "cost/verbosity"}


def test_an_unknown_rule_or_a_broken_record_is_one_line():
    bad = [RewardComponent(type="rule", name="no_such_rule")]
    with pytest.raises(PipelineError, match=r'^ppo.rewards\[0\] \(rule "no_such_rule"\): '
                                            r'rule "no_such_rule": unknown'):
        RewardSpec.resolve(bad, None, reward_clip=5.0, missing_eos_penalty=1.0,
                           lagrangian=False)
    with pytest.raises(PipelineError, match=r"^ppo/manifest.json: extras.reward: not a reward "
                                            r"spec \(KeyError"):
        RewardSpec.from_record({"terms": []}, None, "ppo/manifest.json: extras.reward")

"""The critic-free advantage estimators (RLOO, GRPO, REINFORCE++) and the KL loss term against
values worked out by hand, and the configurations they refuse or warn about."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, advisories, load_config
from stages.ops import (
    critic_free_advantages,
    grpo_advantages,
    kl_penalty_loss,
    reward_to_go,
    rloo_advantages,
)

SQRT2 = math.sqrt(2.0)


def close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol,
                               rtol=0)


# ------------------------------------------------------------------------------- RLOO


def test_rloo_k2_is_half_the_difference_twice():
    # (3, 1): 3 - 1 = 2 and 1 - 3 = -2; (0.5, 2.5): -2 and 2.
    close(rloo_advantages(torch.tensor([3.0, 1.0, 0.5, 2.5]), 2), [2.0, -2.0, -2.0, 2.0])


def test_rloo_ties_within_a_group():
    # [1, 1, 0]: 1 - mean(1, 0) = 0.5 twice, 0 - mean(1, 1) = -1.
    close(rloo_advantages(torch.tensor([1.0, 1.0, 0.0]), 3), [0.5, 0.5, -1.0])


def test_rloo_is_k_over_k_minus_1_times_the_centred_reward():
    r = torch.tensor([0.2, -1.0, 3.0, 0.7])
    close(rloo_advantages(r, 4), (4 / 3 * (r - r.mean())).tolist(), atol=1e-6)


def test_identical_rewards_give_exactly_zero_without_nan():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    for adv in (rloo_advantages(r, 3), grpo_advantages(r, 3), grpo_advantages(r, 3, False)):
        assert torch.equal(adv, torch.zeros(6)), adv


def test_rloo_masked_rows_leave_the_baseline():
    # Group 1: row 1 does not count, so (2, 0) is a group of two: +2, -2. Group 2 has one valid
    # response, which has nothing to compare with: 0.
    r = torch.tensor([2.0, 99.0, 0.0, 5.0, 7.0, -3.0])
    valid = torch.tensor([True, False, True, False, True, False])
    close(rloo_advantages(r, 3, valid), [2.0, 0.0, -2.0, 0.0, 0.0, 0.0])


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantages(torch.zeros(6), 4)


# ------------------------------------------------------------------------------- GRPO


def test_grpo_k2():
    # (3, 1): mean 2, unbiased std sqrt(2): +-1/sqrt(2).
    close(grpo_advantages(torch.tensor([3.0, 1.0]), 2), [1 / SQRT2, -1 / SQRT2], atol=1e-5)


def test_grpo_ties_with_and_without_std():
    # [1, 1, 0, 2]: mean 1, centred [0, 0, -1, 1], unbiased var 2/3.
    r = torch.tensor([1.0, 1.0, 0.0, 2.0])
    s = math.sqrt(2 / 3)
    close(grpo_advantages(r, 4), [0.0, 0.0, -1 / s, 1 / s], atol=1e-5)
    close(grpo_advantages(r, 4, std_normalize=False), [0.0, 0.0, -1.0, 1.0])


def test_grpo_masked_rows_leave_mean_and_std():
    # Valid [2, 0, 4]: mean 2, centred [0, -2, 2], unbiased std 2.
    r = torch.tensor([2.0, 99.0, 0.0, 4.0])
    valid = torch.tensor([True, False, True, True])
    close(grpo_advantages(r, 4, valid=valid), [0.0, 0.0, -1.0, 1.0], atol=1e-5)


# ------------------------------------------------------------------------- reward-to-go


def test_reward_to_go_discounts_and_skips_padding():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 100.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0]])
    # Row 0: 3; 2 + 0.5 * 3 = 3.5; 1 + 0.5 * 3.5 = 2.75. Row 1 skips its hole: 1 + 0.5 * 3.
    close(reward_to_go(rewards, mask, 0.5), [[2.75, 3.5, 3.0], [2.5, 0.0, 3.0], [4.0, 0.0, 0.0]])


# ------------------------------------------------------------- critic-free advantages

# Two responses to one prompt; row 1's second token is padding (its log-ratio of 2 must not
# count). Per-token k1 KL: [[0.5, 0], [0, -]], summed [0.5, 0].
SCORES = torch.tensor([1.0, 0.0])
LOGP = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
REF = torch.tensor([[-1.5, -2.0], [-1.0, -3.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_rloo_subtracts_the_summed_kl_before_the_baseline():
    out = critic_free_advantages(SCORES, LOGP, REF, MASK, estimator="rloo", group_size=2,
                                 beta=0.5)
    # Rewards 1 - 0.5 * 0.5 = 0.75 and 0: +-0.75 on every valid token.
    close(out.advantages, [[0.75, 0.75], [-0.75, 0.0]])
    close(out.sequence_kl, [0.5, 0.0])
    close(out.kl, [[0.5, 0.0], [0.0, 0.0]])
    assert torch.equal(out.returns, torch.zeros(2, 2))
    assert torch.equal(out.cost_returns, torch.zeros(2, 2))


def test_grpo_with_the_kl_in_the_loss_sees_the_score_alone():
    out = critic_free_advantages(SCORES, LOGP, REF, MASK, estimator="grpo", group_size=2,
                                 beta=0.0)
    a = 1 / SQRT2
    close(out.advantages, [[a, a], [-a, 0.0]], atol=1e-5)
    close(out.sequence_kl, [0.5, 0.0])  # still measured, for the log and the controller


def test_reinforce_pp_reward_to_go_of_the_kl_shaped_reward():
    # Per-token rewards: row 0 [-0.25, 1] (KL 0.5 at token 0, score at the end), row 1 [0].
    raw = critic_free_advantages(SCORES, LOGP, REF, MASK, estimator="reinforce_pp",
                                 beta=0.5, whiten_advantages=False)
    close(raw.advantages, [[0.75, 1.0], [0.0, 0.0]])
    whitened = critic_free_advantages(SCORES, LOGP, REF, MASK, estimator="reinforce_pp",
                                      beta=0.5)
    values = torch.tensor([0.75, 1.0, 0.0], dtype=torch.float64)
    z = ((values - values.mean()) / values.std()).tolist()  # unbiased, over valid tokens
    close(whitened.advantages, [[z[0], z[1]], [z[2], 0.0]], atol=1e-5)


def test_a_response_without_tokens_gets_nothing_and_leaves_its_group():
    scores = torch.tensor([1.0, 5.0, 0.0])
    logp = torch.zeros(3, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    out = critic_free_advantages(scores, logp, logp, mask, estimator="rloo", group_size=3,
                                 beta=0.1)
    close(out.advantages, [[1.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert torch.isfinite(out.advantages).all()


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="gae2"):
        critic_free_advantages(SCORES, LOGP, REF, MASK, estimator="gae2", beta=0.1)


# ----------------------------------------------------------------------------- KL loss


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_loss_value_and_gradient_by_hand(kind):
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    loss = kl_penalty_loss(logp, ref, mask, kind)
    loss.backward()
    if kind == "k2":  # mean(0.5 * 0.5^2, 0.5 * 1^2); d/dlogp = (logp - ref) / 2 tokens
        value, grad = (0.125 + 0.5) / 2, [0.25, -0.5, 0.0]
    else:  # e^(ref - logp) - 1 - (ref - logp); d/dlogp = 1 - e^(ref - logp)
        value = ((math.exp(-0.5) - 0.5) + (math.exp(1) - 2)) / 2
        grad = [(1 - math.exp(-0.5)) / 2, (1 - math.exp(1)) / 2, 0.0]
    assert loss.item() == pytest.approx(value, rel=1e-6)
    close(logp.grad, [grad], atol=1e-6)


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_group_estimators_refuse_one_sample_per_prompt(estimator):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"ppo.advantage_estimator={estimator}"])
    (problem,) = exc.value.problems
    assert "ppo.samples_per_prompt=1" in problem and ">= 2" in problem and estimator in problem


@pytest.mark.parametrize(("estimator", "k"), [("gae", 1), ("gae", 3), ("reinforce_pp", 1),
                                              ("rloo", 2), ("grpo", 4)])
def test_estimators_and_k_that_load(estimator, k):
    c = load_config(None, [f"ppo.advantage_estimator={estimator}",
                           f"ppo.samples_per_prompt={k}"]).ppo
    assert (c.advantage_estimator, c.samples_per_prompt) == (estimator, k)


def test_refused_combinations_are_all_named_at_once():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=4",
                           "ppo.kl_in=loss", "ppo.kl_estimator=k1", "ppo.gamma=0.9",
                           "ppo.whiten_rewards=true", "ppo.critic_warmup_updates=2",
                           "ppo.lagrangian=true",
                           "ppo.rewards=[{type: cost, name: profanity}]"])
    text = str(exc.value)
    for key in ("ppo.kl_estimator=k1 with ppo.kl_in=loss", "ppo.gamma=0.9",
                "ppo.whiten_rewards=true", "ppo.critic_warmup_updates=2",
                "ppo.lagrangian=true"):
        assert key in text, key
    assert len(exc.value.problems) == 5


def test_minibatches_divide_all_responses_of_a_rollout():
    with pytest.raises(ConfigError, match="must divide the 12 responses"):
        load_config(None, ["ppo.batch_size=4", "ppo.samples_per_prompt=3",
                           "ppo.num_minibatches=8"])
    # 3 prompts x 4 samples split in 4 minibatches, though 4 does not divide 3 prompts.
    load_config(None, ["ppo.batch_size=3", "ppo.samples_per_prompt=4", "ppo.num_minibatches=4"])


def test_advisories():
    assert advisories(load_config()) == []
    assert advisories(load_config(None, ["ppo.kl_in=loss", "ppo.kl_estimator=k3"])) == []
    (note,) = advisories(load_config(None, ["ppo.kl_estimator=k3"]))
    assert note.startswith("ppo.kl_estimator=k3 with ppo.kl_in=reward")
    grpo = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4"]
    (note,) = advisories(load_config(None, grpo))
    assert "ppo.kl_in=loss" in note
    assert advisories(load_config(None, [*grpo, "ppo.grpo_std_normalize=false"])) == []

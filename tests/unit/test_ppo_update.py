"""The PPO update that starts from evaluation's forward equals one that runs it again."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.config import PPOConfig
from pipeline.training import build_scheduler
from stages.ppo import (
    FirstForward,
    Learner,
    Rollout,
    critic_values,
    make_optimizer,
    minibatch_orders,
    ppo_update,
)
from stages.scoring import PolicyModel, ScoreModel, response_logprobs

torch.set_num_threads(1)


def models():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         num_labels=1)
    return PolicyModel(LlamaForCausalLM(config)), ScoreModel(
        LlamaForSequenceClassification(config))


def rollout(b: int = 4, p: int = 3, t: int = 5) -> Rollout:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, t)
    mask[0, 3:] = 0  # one response ended early
    rand = lambda: torch.randn(b, t, generator=g)  # noqa: E731
    return Rollout(query=torch.randint(2, 41, (b, p), generator=g),
                   query_mask=torch.ones(b, p, dtype=torch.long),
                   response=torch.randint(2, 41, (b, t), generator=g), mask=mask,
                   logprobs=rand() - 3, ref_logprobs=rand() - 3, values=rand(),
                   cost_values=torch.zeros(b, t), scores=torch.randn(b, generator=g),
                   costs=torch.zeros(b), advantages=rand(), returns=rand(),
                   cost_returns=torch.zeros(b, t))


@pytest.mark.parametrize("minibatches", [1, 2])
def test_reusing_the_first_forward_changes_nothing(minibatches):
    c = PPOConfig(ppo_epochs=2, num_minibatches=minibatches, lr=1e-2, critic_lr=1e-2)
    data = rollout()
    orders = minibatch_orders(4, c.ppo_epochs, seed=0)
    results = []
    base_policy, base_critic = models()
    for reuse in (False, True):
        policy, critic = copy.deepcopy(base_policy), copy.deepcopy(base_critic)
        accelerator = Accelerator(cpu=True)
        opts = [make_optimizer(m, lr, c) for m, lr in ((policy, c.lr), (critic, c.critic_lr))]
        scheds = [build_scheduler(o, c.lr_scheduler, 4) for o in opts]
        first = None
        if reuse:
            rows = orders[0][: 4 // minibatches]
            args = (data.query[rows], data.query_mask[rows], data.response[rows],
                    data.mask[rows])
            first = FirstForward(response_logprobs(policy, *args, c.temperature)[0], None,
                                 critic_values(critic, *args))
        learner = Learner(c, accelerator, policy, opts[0], scheds[0], critic, opts[1],
                          scheds[1])
        stats = ppo_update(learner, data, orders, first)
        results.append((policy, critic, stats))
    (p0, c0, s0), (p1, c1, s1) = results
    for a, b in [(p0, p1), (c0, c1)]:
        for (name, x), y in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
    assert s0.keys() == s1.keys()
    for k in s0:
        assert s0[k] == pytest.approx(s1[k], rel=1e-4, abs=1e-6), k
    # the update did move the weights
    start = dict(base_policy.named_parameters())
    assert any(not torch.equal(x, start[n]) for n, x in p0.named_parameters())


@pytest.mark.parametrize("lagrangian", [False, True])
def test_one_step_losses_are_the_clipped_objectives_by_hand(lagrangian):
    """The surrogate clips the ratio at ppo.clip_range around the rollout log-probs, the value
    loss clips at ppo.clip_range_value around the rollout values (both critics' with PPO-
    Lagrangian); different ranges, so swapping them shows."""
    c = PPOConfig(ppo_epochs=1, num_minibatches=1, clip_range=0.05, clip_range_value=0.5,
                  lagrangian=lagrangian)
    policy, critic = models()
    critic = ScoreModel(critic.model, extra_outputs=1)
    data = rollout()
    args = (data.query, data.query_mask, data.response, data.mask)
    with torch.no_grad():
        logp = response_logprobs(policy, *args, c.temperature)[0]
        v = critic_values(critic, *args)  # (B, T, 2)
    g = torch.Generator().manual_seed(2)
    noise = lambda: torch.randn(logp.shape, generator=g)  # noqa: E731
    data.logprobs = logp + 0.3 * noise()  # ratios mostly outside [0.95, 1.05]
    data.values, data.cost_values = v[..., 0] + noise(), v[..., 1] + noise()
    data.returns, data.cost_returns = v[..., 0] + noise(), v[..., 1] + noise()
    opts = [make_optimizer(m, 1e-2, c) for m in (policy, critic)]
    scheds = [build_scheduler(o, c.lr_scheduler, 1) for o in opts]
    learner = Learner(c, Accelerator(cpu=True), policy, opts[0], scheds[0], critic, opts[1],
                      scheds[1])
    stats = ppo_update(learner, data, minibatch_orders(4, 1, seed=0), None)

    valid = data.mask.bool()
    ratio = torch.exp(logp - data.logprobs)
    adv = data.advantages
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.05, 1 + 0.05))
    assert stats["loss/policy"] == pytest.approx(surrogate[valid].mean().item(), rel=1e-5)

    def clipped_value_loss(new, old, target):
        clipped = old + (new - old).clamp(-0.5, 0.5)
        return 0.5 * torch.maximum((new - target) ** 2, (clipped - target) ** 2)[valid].mean()

    expected = clipped_value_loss(v[..., 0], data.values, data.returns)
    if lagrangian:
        expected = expected + clipped_value_loss(v[..., 1], data.cost_values, data.cost_returns)
    assert stats["loss/value"] == pytest.approx(expected.item(), rel=1e-5)


def test_critic_free_update_adds_the_kl_loss_by_hand():
    """Without a critic the update trains the policy alone; with ppo.kl_in=loss the loss is
    the surrogate plus kl_coef times the token-mean KL estimate to the reference."""
    c = PPOConfig(ppo_epochs=1, num_minibatches=1, advantage_estimator="rloo",
                  samples_per_prompt=2, kl_in="loss", kl_estimator="k2")
    policy, _ = models()
    data = rollout()
    args = (data.query, data.query_mask, data.response, data.mask)
    with torch.no_grad():
        logp = response_logprobs(policy, *args, c.temperature)[0]
    data.logprobs = logp.clone()  # ratio 1: the surrogate is -mean(A)
    start = copy.deepcopy(policy)
    opt = make_optimizer(policy, 1e-2, c)
    sched = build_scheduler(opt, c.lr_scheduler, 1)

    class Recorder:  # the guard sees the loss that is differentiated
        def __init__(self):
            self.seen = {}

        def check(self, update, **values):
            self.seen.update(values)

    guard = Recorder()
    learner = Learner(c, Accelerator(cpu=True), policy, opt, sched, guard=guard)
    stats = ppo_update(learner, data, minibatch_orders(4, 1, seed=0), None, kl_coef=0.5)
    valid = data.mask.bool()
    kl = (0.5 * (logp - data.ref_logprobs) ** 2)[valid].mean().item()
    surrogate = -data.advantages[valid].mean().item()
    assert stats["loss/kl"] == pytest.approx(kl, rel=1e-5)
    assert stats["loss/policy"] == pytest.approx(surrogate, rel=1e-5)
    assert guard.seen["policy loss"] == pytest.approx(surrogate + 0.5 * kl, rel=1e-5)
    assert "value loss" not in guard.seen
    assert not any(k.startswith(("val/", "loss/value")) for k in stats)
    moved = dict(start.named_parameters())
    assert any(not torch.equal(x, moved[n]) for n, x in policy.named_parameters())

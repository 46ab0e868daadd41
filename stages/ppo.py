"""Stage 3: PPO against the reward model, with a KL penalty to the SFT reference.

The loop (``train``), once per update, a function per step:
  1. rollout   sample ppo.samples_per_prompt responses to each prompt from the policy
               (temperature T, stop at EOS)
  2. score     the composite reward (stages.composite): reward model (normalized, clipped)
               + rule rewards - costs, missing-EOS penalty
  3. evaluate  policy / reference log-probs at the same T, critic values (gae only); the
               update's first minibatch keeps its graphs, so the update does not run it again
  4. advantage the KL-shaped reward (ppo.kl_in=reward: per-token -beta * KL, the score at the
               last token; PPO-Lagrangian adds a cost stream of +beta * KL with the cost at the
               last token, as in safe-rlhf; ppo.kl_in=loss: the score alone), then
               ppo.advantage_estimator: gae (advantages and returns with gamma, lambda;
               (A_r - lambda A_c) / (1 + lambda) with a constraint; whitened over the batch),
               or without a critic rloo / grpo (group baselines) or reinforce_pp
  5. update    PPO epochs over minibatches: clipped policy loss (+ beta * KL with
               ppo.kl_in=loss) and, with a critic, the clipped value loss
  6. log/save  KL controller, Lagrange multiplier, metrics, samples, snapshots, checkpoints

The stage follows pipeline.lifecycle: ``PPO.check`` opens the parents and loads the models
before the folder is touched, ``PPO.setup`` builds the ``PPOState`` the loop runs on.

Models: policy and frozen reference from the SFT stage (with LoRA, one base: the reference is
the policy with its adapter disabled), the reward model frozen, and for gae the critic, a
separate network initialized from the reward model (with LoRA, an adapter on the reward
model's base, which with the adapter disabled *is* the reward model). The critic-free
estimators build, train and save no critic. Every forward runs under the prepared policy's
autocast, so with bf16 the sampler, policy, reference and reward agree on precision.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from pipeline import sharding
from pipeline.config import Config, PPOConfig, advisories
from pipeline.data import PromptExample, column_map, load_demonstrations, load_prompts
from pipeline.errors import PipelineError
from pipeline.lifecycle import Outcome, Stage
from pipeline.models import (
    apply_lora,
    load_policy,
    load_reward_backbone,
    load_reward_model,
    merged,
    plain_copy,
    save_pretrained_atomic,
    trainable_parameters,
)
from pipeline.normalization import RewardNormalization
from pipeline.progress import progress
from pipeline.rundir import Parent, StageDir
from pipeline.runtime import make_accelerator
from pipeline.text import (
    IGNORE_INDEX,
    decode,
    encode_prompt,
    eos_ids,
    generate,
    pad_prompts,
    tokenize_demonstration,
)
from pipeline.text import pad as pad_sequences
from pipeline.tracking import Tracker
from pipeline.training import (
    Guard,
    build_scheduler,
    check_budget,
    fused_adam_ok,
    load_checkpoint,
    save_checkpoint,
)
from stages import ops
from stages.composite import CompositeReward, RewardSpec
from stages.rewards import load_checked_judge
from stages.scoring import (
    PolicyModel,
    ScoreModel,
    joined_inputs,
    response_logprobs,
    sequence_scores,
)


@dataclass
class Rollout:
    """One batch of experience; B responses of up to T tokens after P prompt tokens."""

    query: torch.Tensor            # (B, P) prompt ids ending at column P (pad_prompts)
    query_mask: torch.Tensor       # (B, P)
    response: torch.Tensor         # (B, T) response ids, right-padded
    mask: torch.Tensor             # (B, T) 1 up to and including the first EOS
    logprobs: torch.Tensor         # (B, T) policy log-probs at sampling time (temperature T)
    ref_logprobs: torch.Tensor     # (B, T) reference log-probs (same temperature)
    values: torch.Tensor           # (B, T) critic's reward values (zeros without a critic)
    cost_values: torch.Tensor      # (B, T) critic's cost values (zeros without a constraint)
    scores: torch.Tensor           # (B,) combined sequence score
    costs: torch.Tensor            # (B,) constrained cost (zeros without a constraint)
    advantages: torch.Tensor       # (B, T)
    returns: torch.Tensor          # (B, T) reward value targets (zeros without a critic)
    cost_returns: torch.Tensor     # (B, T) cost value targets

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------


def rollout_tensors(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    stops: list[int]):
    """The padded tensors of one rollout batch: ``(query, query_mask, response, mask, has_eos,
    lengths)``. Prompts end at the same column, so every response starts there;
    responses are right-padded and masked after their first EOS (a response without one keeps
    all its tokens)."""
    query, query_mask = pad_prompts(prompts, pad_id)            # (B, P)
    response = pad_sequences(responses, pad_id, side="right")        # (B, T)
    mask, has_eos, lengths = ops.response_mask_after_eos(response, stops)
    return query, query_mask, response, mask, has_eos, lengths


def critic_values(critic, query, query_mask, response, mask) -> torch.Tensor:
    """(B, T, C) value estimates of the states before each response token."""
    ids, attention = joined_inputs(query, query_mask, response, mask)
    p = query.shape[1]
    # The state after the last token has no value to estimate: the trunk stops before it.
    return critic(ids[:, :-1], attention[:, :-1])[:, p - 1:]


def minibatch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """One random permutation of the batch per PPO epoch; minibatches are its slices."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator) for _ in range(epochs)]


def forward_groups(first: torch.Tensor, rest: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices for the evaluation forwards: ``first`` whole, then ``rest`` in ``size``s."""
    size = size or max(len(rest), 1)
    return [first] + [rest[s: s + size] for s in range(0, len(rest), size)]


@dataclass
class FirstForward:
    """Policy and critic outputs of epoch 1's first minibatch, computed with gradients during
    evaluation: the weights have not changed yet, so the update reuses them instead of
    running the same forward again."""

    logprobs: torch.Tensor | None  # (b, T) with graph; None while only the critic trains
    entropy: torch.Tensor | None   # (b, T) with graph when the entropy bonus is on
    values: torch.Tensor | None    # (b, T, C) with graph; None without a critic


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def uses_critic(c: PPOConfig) -> bool:
    return c.advantage_estimator == "gae"


def build_models(cfg: Config, sft: Parent, rm: Parent | None, accelerator):
    """(PolicyModel, its reference or None, critic ScoreModel or None when the estimator has
    no critic, reward fn on (ids, mask), tok)."""
    c = cfg.ppo
    policy, tok = load_policy(cfg.model, seed=cfg.run.seed, name_or_path=str(sft.model_dir))
    cost_heads = 1 if c.lagrangian else 0
    if c.lora.enabled:
        lora = copy.copy(c.lora)
        lora.dropout = 0.0
        policy = apply_lora(policy, lora)
        reference = None
    else:
        reference = PolicyModel(copy.deepcopy(policy).requires_grad_(False).eval())

    critic_base = None
    if uses_critic(c) and rm is not None:
        critic_base = load_reward_model(rm.model_dir, cfg.model, tok)
    elif uses_critic(c):
        # Rule-only PPO: the critic starts from the SFT trunk with a fresh head.
        critic_base = load_reward_backbone(str(sft.model_dir), cfg.model, tok, seed=cfg.run.seed)
    if critic_base is not None and c.lora.enabled:
        lora = copy.copy(c.lora)
        lora.dropout = 0.0
        critic_base = apply_lora(critic_base, lora, task_type="SEQ_CLS",
                                 modules_to_save=["score"])
        reward_net = None
    elif rm is not None:
        reward_net = ScoreModel(load_reward_model(rm.model_dir, cfg.model, tok))
        reward_net.requires_grad_(False).eval().to(accelerator.device)
    else:
        reward_net = None
    critic = None if critic_base is None else ScoreModel(critic_base, extra_outputs=cost_heads)

    def reward_scores(ids, attention):
        if rm is None:
            return torch.zeros(ids.shape[0])
        if reward_net is not None:
            return sequence_scores(reward_net, ids, attention)
        # LoRA: the critic's base with its adapter (and its copy of the head) disabled.
        inner = accelerator.unwrap_model(critic)
        with inner.model.disable_adapter():
            return sequence_scores(inner, ids, attention)

    if c.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    return PolicyModel(policy), reference, critic, reward_scores, tok


def reference_context(policy, reference):
    """Where to run the reference: its own copy, or the policy with the adapter off.

    Returns the model and a factory of the context to run it in.
    """
    if reference is not None:
        return reference, contextlib.nullcontext
    return policy, policy.model.disable_adapter


def make_optimizer(model, lr: float, cfg: PPOConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                            fused=fused_adam_ok(params))


# --------------------------------------------------------------------------------------------
# The state of a run
# --------------------------------------------------------------------------------------------


@dataclass
class Learner:
    """What the PPO update trains, each network with its optimizer and scheduler, and what
    else it reads: the demonstrations of PPO-ptx and the numerics guard."""

    cfg: PPOConfig
    accelerator: Accelerator
    policy: PolicyModel
    policy_opt: torch.optim.Optimizer
    policy_sched: Any
    # gae's critic, its optimizer and scheduler; None for the critic-free estimators.
    critic: ScoreModel | None = None
    critic_opt: torch.optim.Optimizer | None = None
    critic_sched: Any = None
    # PPO-ptx: (ids, labels) of the demonstrations; empty when ppo.ptx_coef is 0.
    demos: list = field(default_factory=list)
    pad_id: int = 0
    # Checks every loss and gradient norm before the optimizer applies it (None = off).
    guard: Guard | None = None

    def checkpointed(self) -> dict[str, dict]:
        """A checkpoint's models and optimizers: without a critic, the policy's alone."""
        models = {"policy": self.policy, "critic": self.critic}
        optimizers = {"policy": self.policy_opt, "critic": self.critic_opt,
                      "policy_sched": self.policy_sched, "critic_sched": self.critic_sched}
        return {"models": {k: v for k, v in models.items() if v is not None},
                "optimizers": {k: v for k, v in optimizers.items() if v is not None}}


@dataclass
class PPOState:
    """What the update loop reads and changes; ``PPO.setup`` builds it."""

    cfg: Config
    accelerator: Accelerator
    # The prepared policy and critic with their optimizers.
    learner: Learner
    # What samples and is saved: the policy itself, or under FSDP a whole copy of it.
    sampler: sharding.WholeCopy
    # Forwards without gradients run on the unwrapped models (no DDP collectives).
    unwrapped_policy: PolicyModel
    unwrapped_critic: ScoreModel | None
    # The reference, and the context to run it in (see reference_context).
    ref_model: PolicyModel
    ref_ctx: Callable
    tok: Any
    stops: list[int]
    prompts: list[PromptExample]
    # Each prompt's token ids.
    encoded: list[list[int]]
    reward: CompositeReward
    # The gold judge scored on every rollout for the curves; None = off.
    judge: Any
    kl_ctl: ops.FixedKLController | ops.AdaptiveKLController
    lagrange: ops.LagrangeMultiplier
    stage: StageDir
    tracker: Tracker
    guard: Guard
    # The policy's (trainable, total) parameters.
    params: tuple[int, int]
    # Every update's metrics (on resume, from metrics.jsonl too), for the manifest's summary.
    history: list[dict] = field(default_factory=list)
    bar: Any = None
    # Updates done, the next prompt and the next demonstration (PPO-ptx).
    update: int = 0
    cursor: int = 0
    ptx_cursor: int = 0

    def mean(self, x: torch.Tensor) -> float:
        """The mean of ``x`` over every process's batch."""
        return self.accelerator.reduce(x.detach().float().mean().to(self.accelerator.device),
                                       reduction="mean").item()

    @property
    def all_reduce(self) -> Callable | None:
        """Sums whitening moments across processes; None in one process."""
        if self.accelerator.num_processes == 1:
            return None
        return lambda t: self.accelerator.reduce(t, reduction="sum")


@dataclass
class Batch:
    """Step 1's rollout: this process's prompts and the responses sampled to them."""

    examples: list[PromptExample]  # B: each prompt k times in a row
    responses: list[list[int]]     # B sampled token lists
    query: torch.Tensor            # (B, P) on the device
    query_mask: torch.Tensor       # (B, P)
    response: torch.Tensor         # (B, T)
    mask: torch.Tensor             # (B, T)
    has_eos: torch.Tensor          # (B,) on the CPU
    lengths: torch.Tensor          # (B,) on the CPU

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(query, query_mask, response, mask) of the rows ``index``."""
        return (self.query[index], self.query_mask[index], self.response[index],
                self.mask[index])


@dataclass
class Scores:
    """Step 2's scores of a batch."""

    scores: torch.Tensor            # (B,) on the device: the composite score
    costs: torch.Tensor             # (B,) on the device: the constraint's cost
    parts: dict[str, torch.Tensor]  # (B,) per term, for the log
    texts: list[str]
    gold: torch.Tensor | None       # (B,) the gold judge's, for the curves


@dataclass
class Evaluation:
    """Step 3's per-token reads of a batch at sampling time, without graphs."""

    logprobs: torch.Tensor      # (B, T) policy
    ref_logprobs: torch.Tensor  # (B, T) reference
    entropy: torch.Tensor       # (B, T) policy
    values: torch.Tensor        # (B, T, 2) critic: reward and cost values (zeros without)


# --------------------------------------------------------------------------------------------
# The update loop: one function per step of the module docstring
# --------------------------------------------------------------------------------------------


def train(s: PPOState) -> None:
    """Until ppo.num_updates: rollout, score, evaluate, advantage, update, log/save."""
    c = s.cfg.ppo
    while s.update < c.num_updates:
        t0 = time.time()
        batch = rollout(s)
        t_generate = time.time() - t0

        t1 = time.time()
        scores = score(s, batch)
        train_policy = s.update >= c.critic_warmup_updates
        orders = [o.to(s.accelerator.device) for o in
                  minibatch_orders(len(batch.examples), c.ppo_epochs, s.cfg.run.seed + s.update)]
        evaluation, first = evaluate(s, batch, orders[0], train_policy)
        t_score = time.time() - t1

        beta = s.kl_ctl.value
        experience, adv = advantages(s, batch, scores, evaluation, beta)

        t2 = time.time()
        stats = ppo_update(s.learner, experience, orders, first, train_policy=train_policy,
                           ptx_cursor=s.ptx_cursor, update=s.update + 1, kl_coef=beta)
        del first
        if s.learner.demos:
            s.ptx_cursor += c.ptx_batch_size * c.ppo_epochs * c.num_minibatches
        t_train = time.time() - t2

        log_update(s, batch, scores, evaluation, adv, stats, beta, t0,
                   {"generate": t_generate, "score": t_score, "train": t_train})
        save_update(s)


def rollout(s: PPOState) -> Batch:
    """1. rollout: this process's share of the next prompts, each ppo.samples_per_prompt times
    in a row (rows g*k .. g*k + k - 1 are prompt g's group), sampled from the policy."""
    c, accelerator = s.cfg.ppo, s.accelerator
    index = [(s.cursor + accelerator.process_index * c.batch_size + i) % len(s.prompts)
             for i in range(c.batch_size)]
    s.cursor += c.batch_size * accelerator.num_processes
    index = [i for i in index for _ in range(c.samples_per_prompt)]
    prompts = [s.encoded[i] for i in index]
    # Every forward of the update (sampler, policy, reference, critic, reward) runs under the
    # same autocast as the prepared policy: a bf16 policy against an fp32 reference or sampler
    # has a KL that is not 0 at the start, and can be negative.
    with accelerator.autocast(), s.sampler.whole(s.learner.policy) as whole:
        responses = generate(whole.model, s.tok, prompts, max_new_tokens=c.response_length,
                             temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                             batch_size=len(index))
    # Every response has >= 1 token, and one without EOS has the full length.
    query, query_mask, response, mask, has_eos, lengths = rollout_tensors(
        prompts, responses, s.tok.pad_token_id, s.stops)
    device = accelerator.device
    return Batch([s.prompts[i] for i in index], responses, query.to(device),
                 query_mask.to(device), response.to(device), mask.to(device), has_eos, lengths)


def score(s: PPOState, batch: Batch) -> Scores:
    """2. score: the composite reward of each response (see stages.composite), and the gold
    judge's score for the curves."""
    texts = [decode(s.tok, r) for r in batch.responses]
    questions = [p.prompt for p in batch.examples]
    metas = [{"word": p.word, "reference": p.reference} for p in batch.examples]
    ids, attention = joined_inputs(batch.query, batch.query_mask, batch.response, batch.mask)
    with s.accelerator.autocast():
        scored = s.reward(ids, attention, questions, texts, metas, batch.has_eos)
    for name, value in scored.parts.items():
        s.guard.check_tensor(s.update + 1, f"reward {name}", value)
    gold = None
    if s.judge is not None:
        gold = torch.tensor(s.judge.score(questions, texts,
                                          [p.reference for p in batch.examples]))
    device = s.accelerator.device
    return Scores(scored.score.to(device), scored.cost.to(device), scored.parts, texts, gold)


def evaluate(s: PPOState, batch: Batch, order: torch.Tensor,
             train_policy: bool) -> tuple[Evaluation, FirstForward]:
    """3. evaluate: policy and reference log-probs, and the critic's values, at sampling time.

    The rows of the first minibatch of PPO epoch 1 (the head of ``order``, epoch 1's
    permutation) meet unchanged weights in the update, so their policy and critic forwards run
    here with gradients, on the prepared models, and the update starts from them
    (``FirstForward``); the other rows run in ppo.forward_batch_size chunks without.
    """
    c = s.cfg.ppo
    b = len(batch.examples)
    first_rows = order[: b // c.num_minibatches]
    # Gradient checkpointing acts in training mode only: as in the update.
    s.learner.policy.train()
    if s.learner.critic is not None:
        s.learner.critic.train()
    shape, device = batch.response.shape, s.accelerator.device
    out = Evaluation(torch.zeros(shape, device=device), torch.zeros(shape, device=device),
                     torch.zeros(shape, device=device), torch.zeros(*shape, 2, device=device))
    first = None
    for rows in forward_groups(first_rows, order[len(first_rows):], c.forward_batch_size):
        logp, ent, ref, v = forward(s, batch.rows(rows), first=first is None,
                                    train_policy=train_policy)
        out.logprobs[rows], out.entropy[rows] = logp.detach(), ent.detach()
        out.ref_logprobs[rows] = ref
        if v is not None:
            out.values[rows, :, : v.shape[-1]] = v.detach()
        if first is None:
            first = FirstForward(logp if train_policy else None,
                                 ent if train_policy and c.entropy_coef else None, v)
    return out, first


def forward(s: PPOState, args: tuple[torch.Tensor, ...], first: bool, train_policy: bool):
    """(policy log-probs, entropy, reference log-probs, critic values or None) of some rows.
    ``first``: the rows of the update's first minibatch, whose policy and critic outputs keep
    their graphs (the entropy's too when the bonus is on)."""
    c, accelerator = s.cfg.ppo, s.accelerator
    policy = s.learner.policy if first else s.unwrapped_policy
    with torch.set_grad_enabled(first and train_policy), accelerator.autocast():
        logp, ent = response_logprobs(
            policy, *args, c.temperature,
            entropy="grad" if first and train_policy and c.entropy_coef else "detached")
    with torch.no_grad(), s.ref_ctx(), accelerator.autocast():
        ref = response_logprobs(s.ref_model, *args, c.temperature)[0]
    v = None
    if s.learner.critic is not None:
        critic = s.learner.critic if first else s.unwrapped_critic
        with torch.set_grad_enabled(first), accelerator.autocast():
            v = critic_values(critic, *args)  # (b, T, C)
    return logp, ent, ref, v


def advantages(s: PPOState, batch: Batch, scores: Scores, evaluation: Evaluation,
               beta: float) -> tuple[Rollout, ops.Advantages]:
    """4. advantage: the KL-shaped reward (with ppo.kl_in=loss the score alone; the update
    adds beta * KL) and the estimator's advantages, checked finite; the batch as the update
    trains on it."""
    c = s.cfg.ppo
    reward_beta = beta if c.kl_in == "reward" else 0.0
    values, cost_values = evaluation.values[..., 0], evaluation.values[..., 1]
    if s.learner.critic is not None:
        adv = ops.ppo_advantages(
            scores.scores, evaluation.logprobs, evaluation.ref_logprobs, values, batch.mask,
            beta=reward_beta, kl_kind=c.kl_estimator, gamma=c.gamma, lam=c.lam,
            whiten_rewards=c.whiten_rewards, whiten_advantages=c.whiten_advantages,
            costs=scores.costs if c.lagrangian else None, cost_values=cost_values,
            multiplier=s.lagrange.value, all_reduce=s.all_reduce)
    else:
        adv = ops.critic_free_advantages(
            scores.scores, evaluation.logprobs, evaluation.ref_logprobs, batch.mask,
            estimator=c.advantage_estimator, group_size=c.samples_per_prompt, beta=reward_beta,
            kl_kind=c.kl_estimator, gamma=c.gamma, std_normalize=c.grpo_std_normalize,
            whiten_rewards=c.whiten_rewards, whiten_advantages=c.whiten_advantages,
            all_reduce=s.all_reduce)
    # Before the update: a NaN here would reach the weights through the losses.
    s.guard.check_tensor(s.update + 1, "KL to the reference", adv.sequence_kl)
    s.guard.check_tensor(s.update + 1, "advantage", adv.advantages)
    experience = Rollout(batch.query, batch.query_mask, batch.response, batch.mask,
                         evaluation.logprobs, evaluation.ref_logprobs, values, cost_values,
                         scores.scores, scores.costs, adv.advantages, adv.returns,
                         adv.cost_returns)
    return experience, adv


def ppo_update(learner: Learner, rollout: Rollout, orders: list[torch.Tensor],
               first: FirstForward | None, *, train_policy: bool = True, ptx_cursor: int = 0,
               update: int = 0, kl_coef: float = 0.0) -> dict[str, float]:
    """5. update: PPO epochs over the minibatches that ``orders`` defines (one permutation per
    epoch); ``first`` holds the forward of epoch 1's first minibatch. Returns the mean of each
    loss statistic. The guard checks every loss and gradient norm before the optimizer applies
    it (under fp16 an infinite norm is the loss scaler's overflow signal, so it is not
    checked); ``kl_coef`` weighs the KL loss term when ``ppo.kl_in`` is "loss"; ``update``
    names the update in the guard's message."""
    c, accelerator, guard = learner.cfg, learner.accelerator, learner.guard
    policy, critic = learner.policy, learner.critic
    check_grad = guard is not None and accelerator.scaler is None
    n = rollout.response.shape[0]
    size = n // c.num_minibatches
    totals: dict[str, float] = {}
    count = 0
    policy.train()
    if critic is not None:
        critic.train()
    for order in orders:
        for start in range(0, n, size):
            mb = rollout.select(order[start: start + size])
            args = (mb.query, mb.query_mask, mb.response, mb.mask)
            reuse, first = first, None
            stats: dict[str, torch.Tensor] = {}
            if train_policy:
                if reuse is not None:
                    logp, entropy = reuse.logprobs, reuse.entropy
                else:
                    # The entropy bonus needs a full-vocabulary softmax with its graph: only
                    # computed when it is part of the loss (the logged entropy is the rollout's).
                    logp, entropy = response_logprobs(
                        policy, *args, c.temperature, entropy="grad" if c.entropy_coef else "none")
                pg_loss, pg_stats = ops.policy_loss(logp, mb.logprobs, mb.advantages, mb.mask,
                                                    c.clip_range)
                loss = pg_loss
                if c.kl_in == "loss":
                    kl_loss = ops.kl_penalty_loss(logp, mb.ref_logprobs, mb.mask,
                                                  c.kl_estimator)
                    loss = loss + kl_coef * kl_loss
                    stats["loss/kl"] = kl_loss.detach()
                if c.entropy_coef:
                    loss = loss - c.entropy_coef * ops.masked_mean(entropy, mb.mask)
                if learner.demos:
                    ptx = ptx_loss(policy, learner.demos, ptx_cursor + count * c.ptx_batch_size,
                                   c.ptx_batch_size, learner.pad_id, accelerator.device)
                    loss = loss + c.ptx_coef * ptx
                    stats["loss/ptx"] = ptx.detach()
                if guard is not None:
                    guard.check(update, **{"policy loss": float(loss.detach())})
                accelerator.backward(loss)
                stats["policy/grad_norm"] = accelerator.clip_grad_norm_(policy.parameters(),
                                                                        c.max_grad_norm)
                if check_grad:
                    guard.check(update, **{"policy gradient norm":
                                           float(stats["policy/grad_norm"])})
                learner.policy_opt.step()
                learner.policy_opt.zero_grad()
                stats.update({"loss/policy": pg_loss.detach(),
                              **{f"policy/{k}": v for k, v in pg_stats.items()}})
            if critic is not None:
                v = reuse.values if reuse is not None else critic_values(critic, *args)
                vf_loss, vf_stats = ops.value_loss(v[..., 0], mb.values, mb.returns, mb.mask,
                                                   c.clip_range_value)
                if c.lagrangian:
                    cost_loss, _ = ops.value_loss(v[..., 1], mb.cost_values, mb.cost_returns,
                                                  mb.mask, c.clip_range_value)
                    vf_loss = vf_loss + cost_loss
                if guard is not None:
                    guard.check(update, **{"value loss": float(vf_loss.detach())})
                accelerator.backward(c.vf_coef * vf_loss)
                stats["val/grad_norm"] = accelerator.clip_grad_norm_(critic.parameters(),
                                                                     c.max_grad_norm)
                if check_grad:
                    guard.check(update, **{"value gradient norm":
                                           float(stats["val/grad_norm"])})
                learner.critic_opt.step()
                learner.critic_opt.zero_grad()
                learner.critic_sched.step()
                stats.update({"loss/value": vf_loss.detach(),
                              **{f"val/{k}": v for k, v in vf_stats.items()}})
            learner.policy_sched.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
    means = torch.tensor([totals[k] / count for k in sorted(totals)], device=accelerator.device)
    means = accelerator.reduce(means, reduction="mean")
    return dict(zip(sorted(totals), means.tolist()))


def log_update(s: PPOState, batch: Batch, scores: Scores, evaluation: Evaluation,
               adv: ops.Advantages, stats: dict[str, float], beta: float, t0: float,
               times: dict[str, float]) -> None:
    """6. log: the KL controller and the Lagrange multiplier fed, the update's metrics logged
    (every ppo.log_every) and a table of samples (every ppo.sample_every)."""
    c, accelerator, learner = s.cfg.ppo, s.accelerator, s.learner
    kl_sum = adv.sequence_kl  # (B,)
    mean_kl = s.mean(kl_sum)
    s.kl_ctl.update(mean_kl, len(batch.examples) * accelerator.num_processes)
    mean_cost = s.mean(scores.costs)
    if c.lagrangian:
        s.lagrange.update(mean_cost)
    s.update += 1
    s.bar.update(1)
    n_tokens = accelerator.reduce(batch.lengths.sum().float().to(accelerator.device),
                                  reduction="sum").item()
    elapsed = time.time() - t0
    metrics = {
        "objective/kl": mean_kl,
        "objective/kl_coef": beta,
        "objective/scores": s.mean(scores.scores),
        "objective/non_score_reward": s.mean(-beta * kl_sum),
        "objective/rlhf_reward": s.mean(scores.scores - beta * kl_sum),
        "policy/entropy": s.mean(ops.masked_mean(evaluation.entropy, batch.mask, dim=1)),
        "objective/cost": mean_cost,
        "objective/lambda": s.lagrange.value,
        "response/length": s.mean(batch.lengths.float()),
        "response/no_eos_fraction": s.mean((~batch.has_eos).float()),
        "lr/policy": learner.policy_sched.get_last_lr()[0],
        **({"lr/critic": learner.critic_sched.get_last_lr()[0]}
           if learner.critic is not None else {}),
        **{f"time/{k}": v for k, v in times.items()},
        "time/update": elapsed,
        "perf/tokens_per_s": n_tokens / max(times["generate"], 1e-9),
        "perf/updates_per_s": 1.0 / elapsed,
        **stats,
    }
    for name, value in scores.parts.items():
        metrics[f"reward/{name}"] = s.mean(value)
    if scores.gold is not None:
        metrics["objective/gold"] = s.mean(scores.gold)
    if s.update % c.log_every == 0 or s.update == c.num_updates:
        s.tracker.log(metrics, step=s.update)
        s.bar.log(kl=mean_kl, score=metrics["objective/scores"],
                  reward=metrics["objective/rlhf_reward"])
    s.history.append(metrics)
    if accelerator.is_main_process and (c.sample_every and s.update % c.sample_every == 0
                                        or s.update == c.num_updates):
        table = [{"update": s.update, "prompt": p.prompt, "response": t,
                  "score": round(float(scores.scores[i]), 4), "eos": bool(batch.has_eos[i]),
                  **{k: round(float(v[i]), 4) for k, v in scores.parts.items()}}
                 for i, (p, t) in enumerate(zip(batch.examples, scores.texts))][:8]
        with open(s.stage.samples_path, "a") as f:
            for row in table:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        s.tracker.log_table("samples", table, step=s.update)


def save_update(s: PPOState) -> None:
    """6. save: a snapshot of the policy (every ppo.snapshot_every) and a resumable checkpoint
    (every ppo.save_every); the last update's model is the stage's own."""
    c, accelerator = s.cfg.ppo, s.accelerator
    if c.snapshot_every and s.update % c.snapshot_every == 0 and s.update < c.num_updates:
        with s.sampler.whole(s.learner.policy) as whole:
            if accelerator.is_main_process:
                snapshot = plain_copy(whole.model)
                save_pretrained_atomic(snapshot, s.tok,
                                       s.stage.path / "snapshots" / f"update-{s.update:06d}")
                del snapshot
        accelerator.wait_for_everyone()
    if c.save_every and s.update % c.save_every == 0 and s.update < c.num_updates:
        with s.sampler.whole(s.learner.policy) as whole:
            save_checkpoint(s.stage.checkpoints, s.update, accelerator,
                            **s.learner.checkpointed(),
                            state={"cursor": s.cursor, "ptx_cursor": s.ptx_cursor,
                                   "kl_ctl": s.kl_ctl.state_dict(),
                                   "lagrange": s.lagrange.state_dict()}, config=s.cfg,
                            pretrained=(whole.model, s.tok))


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class PPO(Stage):
    name = "ppo"
    unit = "update"
    resumable = True

    def make_accelerator(self):
        accelerator = make_accelerator(self.cfg, self.cfg.ppo.mixed_precision)
        if sharding.backend(accelerator) == sharding.DEEPSPEED:
            # accelerate builds one DeepSpeed engine per Accelerator and refuses a second model
            # in it; the policy and the critic train with optimizers of their own.
            raise PipelineError("ppo: DeepSpeed is not supported for PPO (it trains two models, "
                                "a policy and a critic, and accelerate gives an Accelerator one "
                                "DeepSpeed engine); launch it with configs/accelerate/fsdp.yaml "
                                "or gpu_ddp.yaml")
        return accelerator

    def check(self) -> None:
        super().check()
        cfg, c = self.cfg, self.cfg.ppo
        check_budget("ppo", self.resume_from, c.num_updates, "ppo.num_updates")
        if self.is_main:
            for note in advisories(cfg):
                print(f"warning: {note}", file=sys.stderr)
        sft = self.open("policy", "sft", c.policy, "ppo.policy")
        rm = (self.open("reward_model", "rm", c.reward_model, "ppo.reward_model")
              if any(comp.type == "model" for comp in c.rewards) else None)
        spec = RewardSpec.from_config(c, RewardNormalization.of(rm) if rm is not None else None)
        self.prompts = load_prompts(cfg.data.ppo, limit=c.num_prompts,
                                    columns=column_map(cfg.data.columns, "ppo"))
        ptx_rows = (load_demonstrations(cfg.data.sft, columns=column_map(cfg.data.columns, "sft"))
                    if c.ptx_coef > 0 else [])
        with self.accelerator.main_process_first():
            self.models = build_models(cfg, sft, rm, self.accelerator)
        policy, _, _, reward_scores, tok = self.models
        self.adopt_tokenizer(tok)
        self.base_model = sft.manifest["base_model"]
        self.reward = CompositeReward(spec, reward_scores)
        self.stops = sorted(eos_ids(tok, policy.model))
        self.encoded = [encode_prompt(tok, p.chat, cfg.data.max_prompt_tokens)
                        for p in self.prompts]
        self.demos = [tokenize_demonstration(tok, d, cfg.data.max_prompt_tokens,
                                             cfg.sft.max_seq_len) for d in ptx_rows]
        self.judge = None
        if c.gold_judge and all(p.reference for p in self.prompts):
            self.judge = load_checked_judge("ppo.gold_judge", c.gold_judge)

    def body(self) -> Outcome:
        s = self.setup()
        train(s)
        return self.save(s)

    def setup(self) -> PPOState:
        """Optimizers, the prepared models and controllers, and on resume the checkpoint's
        state."""
        cfg, c, accelerator = self.cfg, self.cfg.ppo, self.accelerator
        policy, reference, critic, _, tok = self.models
        optim_steps = c.num_updates * c.ppo_epochs * c.num_minibatches
        policy_opt = make_optimizer(policy, c.lr, c)
        policy_sched = build_scheduler(policy_opt, c.lr_scheduler, optim_steps)
        critic_opt = critic_sched = None
        sharding.broadcast_from_main(policy, accelerator)
        if critic is not None:
            critic_opt = make_optimizer(critic, c.critic_lr, c)
            critic_sched = build_scheduler(critic_opt, c.lr_scheduler, optim_steps)
            sharding.broadcast_from_main(critic, accelerator)
        sampler = sharding.WholeCopy(policy, accelerator)
        # One model per prepare: FSDP2 shards one model (and its optimizer) per call.
        policy, policy_opt = accelerator.prepare(policy, policy_opt)
        if critic is not None:
            critic, critic_opt = accelerator.prepare(critic, critic_opt)
        if reference is not None:
            reference = reference.to(accelerator.device)
        learner = Learner(c, accelerator, policy, policy_opt, policy_sched, critic, critic_opt,
                          critic_sched, self.demos, tok.pad_token_id, self.guard)
        kl_ctl = (ops.AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)
                  if c.adaptive_kl else ops.FixedKLController(c.kl_coef))
        lagrange = ops.LagrangeMultiplier(c.lambda_init, c.lambda_lr, c.lambda_max,
                                          c.cost_threshold)
        unwrapped_policy = accelerator.unwrap_model(policy)
        ref_model, ref_ctx = reference_context(unwrapped_policy, reference)
        s = PPOState(cfg, accelerator, learner, sampler, unwrapped_policy,
                     None if critic is None else accelerator.unwrap_model(critic), ref_model,
                     ref_ctx, tok, self.stops, self.prompts, self.encoded, self.reward,
                     self.judge, kl_ctl, lagrange, self.stage, self.tracker, self.guard,
                     trainable_parameters(policy))
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from, accelerator, **learner.checkpointed())
            s.update, s.cursor, s.ptx_cursor = state["step"], state["cursor"], state["ptx_cursor"]
            kl_ctl.load_state_dict(state["kl_ctl"])
            lagrange.load_state_dict(state["lagrange"])
            if self.is_main:
                # The curve summary in the manifest covers the whole run, not just the
                # resumed part.
                s.history = [json.loads(line)
                             for line in self.tracker.path.read_text().splitlines() if line]
        s.bar = progress(c.num_updates, "ppo", cfg.tracking.progress and self.is_main,
                         initial=s.update, unit="update")
        return s

    def save(self, s: PPOState) -> Outcome:
        """The policy's model/ (LoRA merged) and the manifest's summary and extras."""
        c = self.cfg.ppo
        s.bar.close()
        final = merged(s.sampler.fill(s.learner.policy).model)
        if self.is_main:
            save_pretrained_atomic(final, s.tok, self.stage.path / "model")
        self.wait()
        summary = summarize(s.history)
        summary.update({"updates": s.update, "world_size": s.accelerator.num_processes,
                        "trainable_params": s.params[0], "total_params": s.params[1]})
        norm = s.reward.spec.normalization
        return Outcome(summary, {"kl_coef": s.kl_ctl.value, "lambda": s.lagrange.value,
                                 "lora": c.lora.enabled, "temperature": c.temperature,
                                 "norm": norm.as_extras() if norm is not None else {},
                                 "reward": s.reward.spec.record(), **algorithm(c)})


def run(cfg: Config) -> Path:
    """The PPO stage of ``cfg``'s run; returns its finished folder."""
    return PPO(cfg).run()


def algorithm(c: PPOConfig) -> dict:
    """What the manifest records of the algorithm, for eval and report to label the run."""
    return {"advantage_estimator": c.advantage_estimator,
            "samples_per_prompt": c.samples_per_prompt, "kl_in": c.kl_in,
            "kl_estimator": c.kl_estimator, "critic": uses_critic(c),
            **({"grpo_std_normalize": c.grpo_std_normalize}
               if c.advantage_estimator == "grpo" else {})}


def ptx_loss(policy: PolicyModel, demos, cursor: int, batch_size: int, pad_id: int,
             device) -> torch.Tensor:
    """PPO-ptx: the SFT loss on demonstrations, so RL doesn't forget how to write them."""
    batch = [demos[(cursor + i) % len(demos)] for i in range(batch_size)]
    ids = pad_sequences([b[0] for b in batch], pad_id).to(device)
    labels = pad_sequences([b[1] for b in batch], IGNORE_INDEX).to(device)
    attention = (pad_sequences([[1] * len(b[0]) for b in batch], 0)).to(device)
    trained = labels != IGNORE_INDEX  # where labels == ids: the assistant's tokens
    trained[:, 0] = False             # nothing predicts the first token
    logp, _ = policy(ids, attention, trained)
    return -ops.masked_mean(logp, trained)


def summarize(history: list[dict]) -> dict:
    """Start and end values of the main curves (means of the first and last few updates)."""
    if not history:
        return {}
    k = max(1, min(5, len(history) // 4))
    out = {}
    for key in ("objective/scores", "objective/kl", "objective/gold", "objective/rlhf_reward",
                "response/length", "response/no_eos_fraction", "objective/cost",
                "time/update", "time/generate", "time/score", "time/train", "perf/tokens_per_s"):
        if key not in history[0]:
            continue
        name = key.split("/", 1)[1]
        out[f"{name}_start"] = sum(h[key] for h in history[:k]) / k
        out[f"{name}_end"] = sum(h[key] for h in history[-k:]) / k
    return out


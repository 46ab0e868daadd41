"""Stage 3: PPO against the reward model, with a KL penalty to the SFT reference.

The loop, once per update:
  1. rollout   sample ppo.samples_per_prompt responses to each prompt from the policy
               (temperature T, stop at EOS)
  2. score     reward model (normalized, clipped) + rule rewards + costs, missing-EOS penalty
  3. evaluate  policy / reference log-probs at the same T, critic values (gae only)
  4. reward    with ppo.kl_in=reward, per-token -beta * KL, score at the last token
               (PPO-Lagrangian: a cost stream of +beta * KL with the cost at the last token,
               as in safe-rlhf); with ppo.kl_in=loss, the score alone
  5. advantage ppo.advantage_estimator: gae (advantages and returns with gamma, lambda;
               (A_r - lambda A_c) / (1 + lambda) with a constraint; whitened over the batch),
               or without a critic rloo / grpo (group baselines) or reinforce_pp
  6. update    PPO epochs over minibatches: clipped policy loss (+ beta * KL with
               ppo.kl_in=loss) and, with a critic, the clipped value loss
  7. log/save  metrics, samples, KL controller, Lagrange multiplier, checkpoints

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
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from pipeline import sharding
from pipeline.config import Config, PPOConfig, advisories
from pipeline.data import PromptExample, column_map, load_demonstrations, load_prompts
from pipeline.errors import PipelineError
from pipeline.models import (
    apply_lora,
    load_policy,
    load_reward_backbone,
    load_reward_model,
    merged,
    plain_copy,
    save_pretrained_atomic,
    tokenizer_sha256,
    trainable_parameters,
)
from pipeline.normalization import RewardNormalization
from pipeline.progress import progress
from pipeline.rundir import Parent, StageDir, check_same_tokenizer, open_parent, stage_dir
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
    resume_checkpoint,
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


def _reward_parent(cfg: Config) -> Parent | None:
    if not any(c.type == "model" for c in cfg.ppo.rewards):
        return None
    return open_parent(stage_dir(cfg, "rm", cfg.ppo.reward_model), "rm", "ppo.reward_model")


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
# The stage
# --------------------------------------------------------------------------------------------


def run(cfg: Config) -> Path:
    c = cfg.ppo
    accelerator = make_accelerator(cfg, c.mixed_precision)
    if sharding.backend(accelerator) == sharding.DEEPSPEED:
        # accelerate builds one DeepSpeed engine per Accelerator and refuses a second model in
        # it; the policy and the critic train with optimizers of their own.
        raise PipelineError("ppo: DeepSpeed is not supported for PPO (it trains two models, a "
                            "policy and a critic, and accelerate gives an Accelerator one "
                            "DeepSpeed engine); launch it with configs/accelerate/fsdp.yaml "
                            "or gpu_ddp.yaml")
    stage = StageDir(cfg, "ppo", accelerator.is_main_process)
    # Everything that can refuse the run does so before stage.start() clears an old ppo dir.
    stage.check()
    resume_from = resume_checkpoint(stage, cfg)
    check_budget("ppo", resume_from, c.num_updates, "ppo.num_updates")
    guard = Guard("ppo", stage.checkpoints, unit="update")
    world = accelerator.num_processes
    k = c.samples_per_prompt
    if accelerator.is_main_process:
        for note in advisories(cfg):
            print(f"warning: {note}", file=sys.stderr)

    # --- Setup ---------------------------------------------------------------------------------
    sft = open_parent(stage_dir(cfg, "sft", c.policy), "sft", "ppo.policy")
    rm = _reward_parent(cfg)
    norm = RewardNormalization.of(rm) if rm is not None else None
    reward_spec = RewardSpec.from_config(c, norm)
    prompts = load_prompts(cfg.data.ppo, limit=c.num_prompts,
                           columns=column_map(cfg.data.columns, "ppo"))
    ptx_rows = (load_demonstrations(cfg.data.sft, columns=column_map(cfg.data.columns, "sft"))
                if c.ptx_coef > 0 else [])
    with accelerator.main_process_first():
        policy, reference, critic, reward_scores, tok = build_models(cfg, sft, rm, accelerator)
    tok_sha = tokenizer_sha256(tok)
    if tok_sha != sft.manifest.get("tokenizer_sha256"):
        raise PipelineError(f"ppo.policy: {sft.path}/model tokenizer does not match its manifest")
    if rm is not None:
        check_same_tokenizer(tok_sha, rm, "ppo.reward_model")
    reward_fn = CompositeReward(reward_spec, reward_scores)
    stops = sorted(eos_ids(tok, policy.model))

    encoded = [encode_prompt(tok, p.chat, cfg.data.max_prompt_tokens) for p in prompts]
    demos = [tokenize_demonstration(tok, d, cfg.data.max_prompt_tokens, cfg.sft.max_seq_len)
             for d in ptx_rows]
    judge = None
    if c.gold_judge and all(p.reference for p in prompts):
        judge = load_checked_judge("ppo.gold_judge", c.gold_judge)
    stage.start()

    optim_steps = c.num_updates * c.ppo_epochs * c.num_minibatches
    policy_opt = make_optimizer(policy, c.lr, c)
    policy_sched = build_scheduler(policy_opt, c.lr_scheduler, optim_steps)
    critic_opt = critic_sched = None
    sharding.broadcast_from_main(policy, accelerator)
    if critic is not None:
        critic_opt = make_optimizer(critic, c.critic_lr, c)
        critic_sched = build_scheduler(critic_opt, c.lr_scheduler, optim_steps)
        sharding.broadcast_from_main(critic, accelerator)
    # What samples and is saved: the policy itself, or under FSDP a whole copy of it.
    sampler = sharding.WholeCopy(policy, accelerator)
    # One model per prepare: FSDP2 shards one model (and its optimizer) per call.
    policy, policy_opt = accelerator.prepare(policy, policy_opt)
    if critic is not None:
        critic, critic_opt = accelerator.prepare(critic, critic_opt)
    if reference is not None:
        reference = reference.to(accelerator.device)
    kl_ctl = (ops.AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
              else ops.FixedKLController(c.kl_coef))
    lagrange = ops.LagrangeMultiplier(c.lambda_init, c.lambda_lr, c.lambda_max, c.cost_threshold)
    n_trainable, n_total = trainable_parameters(policy)

    update, cursor, ptx_cursor = 0, 0, 0
    # Without a critic, checkpoints hold the policy's weights and optimizer only.
    models = {name: m for name, m in {"policy": policy, "critic": critic}.items()
              if m is not None}
    optimizers = {name: o for name, o in {"policy": policy_opt, "critic": critic_opt,
                                          "policy_sched": policy_sched,
                                          "critic_sched": critic_sched}.items() if o is not None}
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, models=models, optimizers=optimizers)
        update, cursor, ptx_cursor = state["step"], state["cursor"], state["ptx_cursor"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        lagrange.load_state_dict(state["lagrange"])
    tracker = Tracker(cfg, "ppo", stage.path, accelerator.is_main_process,
                      resume_step=update if resume_from else None)
    unwrapped_policy = accelerator.unwrap_model(policy)
    unwrapped_critic = None if critic is None else accelerator.unwrap_model(critic)
    ref_model, ref_ctx = reference_context(unwrapped_policy, reference)
    history: list[dict] = []
    if resume_from is not None and accelerator.is_main_process:
        # The curve summary in the manifest covers the whole run, not just the resumed part.
        history = [json.loads(line) for line in tracker.path.read_text().splitlines() if line]
    bar = progress(c.num_updates, "ppo", cfg.tracking.progress and accelerator.is_main_process,
                   initial=update, unit="update")
    all_reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None

    def global_mean(x: torch.Tensor) -> float:
        return accelerator.reduce(x.detach().float().mean().to(accelerator.device),
                                  reduction="mean").item()

    while update < c.num_updates:
        t0 = time.time()
        # --- 1. Rollout: this process's share of the next batch of prompts ------------------
        index = [(cursor + accelerator.process_index * c.batch_size + i) % len(prompts)
                 for i in range(c.batch_size)]
        cursor += c.batch_size * world
        # Each prompt k times in a row: rows g*k .. g*k + k - 1 are prompt g's group.
        index = [i for i in index for _ in range(k)]
        batch_prompts: list[PromptExample] = [prompts[i] for i in index]
        # Every forward of the update (sampler, policy, reference, critic, reward) runs under
        # the same autocast as the prepared policy: a bf16 policy against an fp32 reference or
        # sampler has a KL that is not 0 at the start, and can be negative.
        with accelerator.autocast(), sampler.whole(policy) as whole:
            responses = generate(whole.model, tok, [encoded[i] for i in index],
                                 max_new_tokens=c.response_length, temperature=c.temperature,
                                 top_k=c.top_k, top_p=c.top_p, batch_size=len(index))
        # Every response has >= 1 token, and one without EOS has the full length.
        query, query_mask, response, mask, has_eos, lengths = rollout_tensors(
            [encoded[i] for i in index], responses, tok.pad_token_id, stops)
        query, query_mask = query.to(accelerator.device), query_mask.to(accelerator.device)
        response, mask = response.to(accelerator.device), mask.to(accelerator.device)
        t_generate = time.time() - t0

        # --- 2. Score: reward model, rules, costs ------------------------------------------
        t1 = time.time()
        texts = [decode(tok, r) for r in responses]
        metas = [{"word": p.word, "reference": p.reference} for p in batch_prompts]
        ids, attention = joined_inputs(query, query_mask, response, mask)
        with accelerator.autocast():
            scores, costs, parts = reward_fn(ids, attention, [p.prompt for p in batch_prompts],
                                             texts, metas, has_eos)
        for name, value in parts.items():
            guard.check_tensor(update + 1, f"reward {name}", value)
        scores = scores.to(accelerator.device)
        costs = costs.to(accelerator.device)
        gold = None
        if judge is not None:
            gold = torch.tensor(judge.score([p.prompt for p in batch_prompts], texts,
                                            [p.reference for p in batch_prompts]))

        # --- 3. Evaluate: log-probs of policy and reference, critic values -----------------
        # The first minibatch of PPO epoch 1 sees unchanged weights, so its forward happens
        # here, with gradients, and the update starts from it instead of repeating it.
        train_policy = update >= c.critic_warmup_updates
        policy.train()  # as in the update (gradient checkpointing acts in training mode only)
        if critic is not None:
            critic.train()
        b = len(responses)
        orders = [o.to(accelerator.device)
                  for o in minibatch_orders(b, c.ppo_epochs, seed=cfg.run.seed + update)]
        first_rows = orders[0][: b // c.num_minibatches]
        logprobs = torch.zeros(response.shape, device=accelerator.device)   # (B, T)
        ref_logprobs, entropy = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
        values = torch.zeros(*response.shape, 2, device=accelerator.device)  # (B, T, 2)
        first = None
        for i, rows in enumerate(forward_groups(first_rows, orders[0][len(first_rows):],
                                                c.forward_batch_size)):
            args = (query[rows], query_mask[rows], response[rows], mask[rows])
            reuse = i == 0
            with torch.set_grad_enabled(reuse and train_policy), accelerator.autocast():
                logp, ent = response_logprobs(
                    policy if reuse else unwrapped_policy, *args, c.temperature,
                    entropy="grad" if reuse and train_policy and c.entropy_coef else "detached")
            with torch.no_grad(), ref_ctx(), accelerator.autocast():
                ref_logprobs[rows] = response_logprobs(ref_model, *args, c.temperature)[0]
            v = None
            if critic is not None:
                with torch.set_grad_enabled(reuse), accelerator.autocast():
                    v = critic_values(critic if reuse else unwrapped_critic, *args)  # (b, T, C)
                values[rows, :, : v.shape[-1]] = v.detach()
            logprobs[rows], entropy[rows] = logp.detach(), ent.detach()
            if reuse:
                first = FirstForward(logp if train_policy else None,
                                     ent if train_policy and c.entropy_coef else None, v)
        values, cost_values = values[..., 0], values[..., 1]  # cost: zeros without a constraint
        t_score = time.time() - t1

        # --- 4-5. KL-shaped rewards and advantages (ppo.advantage_estimator) ----------------
        beta = kl_ctl.value
        # With ppo.kl_in=loss the reward is the score alone; the update adds beta * KL.
        reward_beta = beta if c.kl_in == "reward" else 0.0
        if critic is not None:
            adv = ops.ppo_advantages(
                scores, logprobs, ref_logprobs, values, mask, beta=reward_beta,
                kl_kind=c.kl_estimator, gamma=c.gamma, lam=c.lam,
                whiten_rewards=c.whiten_rewards, whiten_advantages=c.whiten_advantages,
                costs=costs if c.lagrangian else None, cost_values=cost_values,
                multiplier=lagrange.value, all_reduce=all_reduce)
        else:
            adv = ops.critic_free_advantages(
                scores, logprobs, ref_logprobs, mask, estimator=c.advantage_estimator,
                group_size=k, beta=reward_beta, kl_kind=c.kl_estimator, gamma=c.gamma,
                std_normalize=c.grpo_std_normalize, whiten_rewards=c.whiten_rewards,
                whiten_advantages=c.whiten_advantages, all_reduce=all_reduce)
        # Before the update: a NaN here would reach the weights through the losses.
        guard.check_tensor(update + 1, "KL to the reference", adv.sequence_kl)
        guard.check_tensor(update + 1, "advantage", adv.advantages)
        rollout = Rollout(query, query_mask, response, mask, logprobs, ref_logprobs, values,
                          cost_values, scores, costs, adv.advantages, adv.returns,
                          adv.cost_returns)

        # --- 6. PPO update ------------------------------------------------------------------
        t2 = time.time()
        stats = ppo_update(c, rollout, orders, first, policy, critic, policy_opt, critic_opt,
                           policy_sched, critic_sched, accelerator, train_policy, demos,
                           ptx_cursor, tok.pad_token_id, guard, update + 1, kl_coef=beta)
        del first
        ptx_cursor += c.ptx_batch_size * c.ppo_epochs * c.num_minibatches if demos else 0
        t_train = time.time() - t2

        # --- 7. Controllers, logging, saving -------------------------------------------------
        kl_sum = adv.sequence_kl  # (B,)
        mean_kl = global_mean(kl_sum)
        kl_ctl.update(mean_kl, len(index) * world)
        mean_cost = global_mean(costs)
        if c.lagrangian:
            lagrange.update(mean_cost)
        update += 1
        bar.update(1)
        n_tokens = accelerator.reduce(lengths.sum().float().to(accelerator.device),
                                      reduction="sum").item()
        elapsed = time.time() - t0
        metrics = {
            "objective/kl": mean_kl,
            "objective/kl_coef": beta,
            "objective/scores": global_mean(scores),
            "objective/non_score_reward": global_mean(-beta * kl_sum),
            "objective/rlhf_reward": global_mean(scores - beta * kl_sum),
            "policy/entropy": global_mean(ops.masked_mean(entropy, mask, dim=1)),
            "objective/cost": mean_cost,
            "objective/lambda": lagrange.value,
            "response/length": global_mean(lengths.float()),
            "response/no_eos_fraction": global_mean((~has_eos).float()),
            "lr/policy": policy_sched.get_last_lr()[0],
            **({"lr/critic": critic_sched.get_last_lr()[0]} if critic is not None else {}),
            "time/generate": t_generate,
            "time/score": t_score,
            "time/train": t_train,
            "time/update": elapsed,
            "perf/tokens_per_s": n_tokens / max(t_generate, 1e-9),
            "perf/updates_per_s": 1.0 / elapsed,
            **stats,
        }
        for name, value in parts.items():
            metrics[f"reward/{name}"] = global_mean(value)
        if gold is not None:
            metrics["objective/gold"] = global_mean(gold)
        if update % c.log_every == 0 or update == c.num_updates:
            tracker.log(metrics, step=update)
            bar.log(kl=mean_kl, score=metrics["objective/scores"],
                    reward=metrics["objective/rlhf_reward"])
        history.append(metrics)
        if accelerator.is_main_process and (c.sample_every and update % c.sample_every == 0
                                            or update == c.num_updates):
            table = [{"update": update, "prompt": p.prompt, "response": t,
                      "score": round(float(scores[i]), 4), "eos": bool(has_eos[i]),
                      **{k: round(float(v[i]), 4) for k, v in parts.items()}}
                     for i, (p, t) in enumerate(zip(batch_prompts, texts))][:8]
            with open(stage.samples_path, "a") as f:
                for row in table:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            tracker.log_table("samples", table, step=update)
        if c.snapshot_every and update % c.snapshot_every == 0 and update < c.num_updates:
            with sampler.whole(policy) as whole:
                if accelerator.is_main_process:
                    snapshot = plain_copy(whole.model)
                    save_pretrained_atomic(snapshot, tok,
                                           stage.path / "snapshots" / f"update-{update:06d}")
                    del snapshot
            accelerator.wait_for_everyone()
        if c.save_every and update % c.save_every == 0 and update < c.num_updates:
            with sampler.whole(policy) as whole:
                save_checkpoint(stage.checkpoints, update, accelerator, models=models,
                                optimizers=optimizers,
                                state={"cursor": cursor, "ptx_cursor": ptx_cursor,
                                       "kl_ctl": kl_ctl.state_dict(),
                                       "lagrange": lagrange.state_dict()}, config=cfg,
                                pretrained=(whole.model, tok))
    bar.close()

    # --- Save ----------------------------------------------------------------------------------
    final = merged(sampler.fill(policy).model)
    if accelerator.is_main_process:
        save_pretrained_atomic(final, tok, stage.path / "model")
    accelerator.wait_for_everyone()
    summary = summarize(history)
    summary.update({"updates": update, "world_size": world, "trainable_params": n_trainable,
                    "total_params": n_total})
    tracker.summary(summary)
    tracker.close()
    parents = {"policy": sft}
    if rm is not None:
        parents["reward_model"] = rm
    return stage.finish(metrics=summary, parents=parents, base_model=sft.manifest["base_model"],
                        tokenizer_sha256=tok_sha,
                        extras={"kl_coef": kl_ctl.value, "lambda": lagrange.value,
                                "lora": c.lora.enabled, "temperature": c.temperature,
                                "norm": norm.as_extras() if norm is not None else {},
                                "reward": reward_spec.record(),
                                **algorithm(c)})


def algorithm(c: PPOConfig) -> dict:
    """What the manifest records of the algorithm, for eval and report to label the run."""
    return {"advantage_estimator": c.advantage_estimator,
            "samples_per_prompt": c.samples_per_prompt, "kl_in": c.kl_in,
            "kl_estimator": c.kl_estimator, "critic": uses_critic(c),
            **({"grpo_std_normalize": c.grpo_std_normalize}
               if c.advantage_estimator == "grpo" else {})}


def ppo_update(c: PPOConfig, rollout: Rollout, orders: list[torch.Tensor],
               first: FirstForward | None, policy, critic, policy_opt, critic_opt,
               policy_sched, critic_sched, accelerator, train_policy: bool,
               demos: list, ptx_cursor: int, pad_id: int, guard: Guard | None = None,
               update: int = 0, kl_coef: float = 0.0) -> dict[str, float]:
    """PPO epochs over the minibatches that ``orders`` defines (one permutation per epoch);
    ``first`` holds the forward of epoch 1's first minibatch. Returns the mean of each loss
    statistic. ``guard`` checks every loss and gradient norm before the optimizer applies it
    (under fp16 an infinite norm is the loss scaler's overflow signal, so it is not checked).
    ``critic`` (with its optimizer and scheduler) is None for the critic-free estimators;
    ``kl_coef`` weighs the KL loss term when ``c.kl_in`` is "loss"."""
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
                if demos:
                    ptx = ptx_loss(policy, demos, ptx_cursor + count * c.ptx_batch_size,
                                   c.ptx_batch_size, pad_id, accelerator.device)
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
                policy_opt.step()
                policy_opt.zero_grad()
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
                critic_opt.step()
                critic_opt.zero_grad()
                critic_sched.step()
                stats.update({"loss/value": vf_loss.detach(),
                              **{f"val/{k}": v for k, v in vf_stats.items()}})
            policy_sched.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
    means = torch.tensor([totals[k] / count for k in sorted(totals)], device=accelerator.device)
    means = accelerator.reduce(means, reduction="mean")
    return dict(zip(sorted(totals), means.tolist()))


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


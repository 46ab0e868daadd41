"""Pure tensor math shared by the SFT, reward-modelling and PPO stages.

Nothing here knows about models, tokenizers or accelerate: every function takes
tensors (or plain Python numbers) and returns tensors, so it can be unit-tested
against numbers worked out by hand.

Shape conventions: ``B`` batch, ``T`` (response) sequence length, ``V`` vocabulary,
``N`` number of scored responses, ``P`` number of preference pairs.
Masks are 0/1 float or bool tensors; 1 marks a valid (response) token.

References:
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE".
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
    Ouyang et al. 2022, "Training language models to follow instructions" (InstructGPT).
    Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from Human Feedback".
    Schulman 2020, "Approximating KL Divergence" (k1/k2/k3 estimators).
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization" (RLOO).
    Shao et al. 2024, "DeepSeekMath" (GRPO); Liu et al. 2025, "Understanding R1-Zero-Like
    Training" (Dr. GRPO); Hu 2025, "REINFORCE++".
    Guo et al. 2017, "On Calibration of Modern Neural Networks" (ECE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "Advantages",
    "FixedKLController",
    "LagrangeMultiplier",
    "Workspace",
    "best_worst_pairs",
    "bradley_terry_loss",
    "bradley_terry_pairs",
    "critic_free_advantages",
    "entropy_from_logits",
    "expected_calibration_error",
    "first_true_index",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "kl_penalty_loss",
    "kl_shaped_rewards",
    "lagrangian_advantages",
    "last_index",
    "logprobs_and_entropy",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "policy_loss",
    "ppo_advantages",
    "response_mask_after_eos",
    "reward_to_go",
    "rloo_advantages",
    "value_loss",
]

WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------- masks


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is set.

    Args:
        x: any shape.
        mask: same shape as ``x``, 0/1 or bool.
        dim: reduce over this dim only; ``None`` reduces over everything.
    """
    # where() rather than x * mask: padding positions may hold inf/nan (e.g. logp of a
    # pad token) and 0 * inf would poison the sum.
    masked = torch.where(_as_bool(mask), x, torch.zeros_like(x))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set (0 if there are none).

    Args:
        x: any shape.
        mask: same shape as ``x``, 0/1 or bool.
        dim: reduce over this dim only; ``None`` reduces over everything (scalar).
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    # An all-padding row yields 0 instead of nan, so one empty response cannot
    # turn a whole batch's loss into nan.
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Normalise the valid entries of ``x`` to zero mean and unit variance.

    Args:
        x: any shape, e.g. advantages ``(B, T)``.
        mask: same shape, 0/1 or bool.
        shift_mean: if False, the mean is added back so only the scale changes
            (used for rewards, whose sign carries meaning).
        all_reduce: optional ``f(Tensor[3]) -> Tensor[3]`` summing
            ``[sum, sum_sq, count]`` across processes, so every rank whitens with
            the *global* statistics rather than its own micro-batch's.

    Returns:
        Tensor shaped like ``x``; invalid positions are 0.  The mean and variance are
        treated as constants (no gradient flows through them), as they would be
        after a collective anyway.
    """
    valid = _as_bool(mask)
    # Moments go through sum / sum-of-squares because those are what can be summed
    # across ranks; float64 limits the cancellation in E[x^2] - E[x]^2.
    xd = torch.where(valid, x.detach().to(torch.float64), 0.0)
    moments = torch.stack([xd.sum(), (xd * xd).sum(), valid.sum().to(torch.float64)])
    if all_reduce is not None:
        moments = all_reduce(moments)
    total, total_sq, count = moments.unbind()
    count_c = count.clamp(min=1.0)
    mean = total / count_c
    var = (total_sq / count_c - mean * mean).clamp(min=0.0)
    if count > 1:
        var = var * count / (count - 1)
    mean = mean.to(x.dtype)
    inv_std = torch.rsqrt(var + WHITEN_EPS).to(x.dtype)
    whitened = (x - mean) * inv_std
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, torch.zeros_like(whitened))


def first_true_index(mask_bool: Tensor) -> Tensor:
    """Index of the first True along the last dim.

    Args:
        mask_bool: ``(B, T)`` bool (or 0/1).

    Returns:
        ``(B,)`` long; ``T`` for rows with no True, so ``idx < T`` tests presence.
    """
    m = _as_bool(mask_bool)
    t = m.shape[-1]
    positions = torch.arange(t, device=m.device).expand_as(m)
    return torch.where(m, positions, t).min(dim=-1).values


def last_index(mask: Tensor) -> Tensor:
    """Index of the last valid token of each row.

    Args:
        mask: ``(B, T)`` 0/1 or bool.

    Returns:
        ``(B,)`` long; rows with no valid token give 0 (callers that care should
        check ``mask.sum(-1) > 0``).
    """
    m = _as_bool(mask)
    t = m.shape[-1]
    from_end = first_true_index(m.flip(-1))  # (B,) == T when the row is empty
    return (t - 1 - from_end).clamp(min=0)


def response_mask_after_eos(
    tokens: Tensor, eos_token_id: int | Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask that keeps a generated response up to and including its first EOS.

    Args:
        tokens: ``(B, T)`` generated token ids (response part only).
        eos_token_id: one id or several (chat templates often end turns with
            more than one stop token).

    Returns:
        mask: ``(B, T)`` float, 1 up to and including the first EOS, 0 after;
            all ones for rows that never emit EOS (truncated at max length).
        has_eos: ``(B,)`` bool.
        lengths: ``(B,)`` long, number of valid tokens.
    """
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    t = tokens.shape[-1]
    first = first_true_index(eos)  # (B,)
    has_eos = first < t
    lengths = torch.where(has_eos, first + 1, t)
    positions = torch.arange(t, device=tokens.device)  # (T,)
    mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float32)
    return mask, has_eos, lengths


# ------------------------------------------------------------------ log-probabilities


# Rows of a (N, V) logits matrix handled per step by the fused log-prob passes: about 8 MB
# of float32, so a chunk's max, exp and sum passes reuse the cache instead of streaming a
# (B, T, V) tensor from memory several times (3x faster than the unfused ops at V = 49k).
_CHUNK_ELEMENTS = 1 << 21


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _chunk_logsumexp(x: Tensor, inv_temperature: float,
                     with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """``logsumexp(x / T)`` of each row of a (n, V) chunk, and optionally the entropy."""
    x = x.float()
    m = x.amax(dim=-1, keepdim=True)                                  # (n, 1)
    e = torch.sub(x, m).mul_(inv_temperature).exp_()                  # (n, V) exp(z - max z)
    total = e.sum(dim=-1)                                             # (n,)
    lse = total.log() + m.squeeze(-1) * inv_temperature
    if not with_entropy:
        return lse, None
    # H = logsumexp(z) - E_p[z]: no log of underflowed probabilities. A -inf logit (a masked
    # token) has p = 0 and adds 0 to E_p[z]; the product 0 * -inf is nan, so it is zeroed. A
    # nan or +inf logit already makes lse nan, so this hides nothing.
    weighted = (e * x).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    mean_z = weighted.sum(dim=-1) / total * inv_temperature
    return lse, lse - mean_z


def _logprob_grad(x: Tensor, lse: Tensor, inv_temperature: float, g: Tensor, y: Tensor,
                  out: Tensor) -> Tensor:
    """Write ``g * d logp / dx`` of ``logp = log softmax(x / T)[y]`` into ``out`` (N, V).

    ``g`` is already scaled by 1/T. ``out`` may be ``x`` itself: the logits are then
    overwritten with their own gradient, chunk by chunk.
    """
    for s in _row_chunks(*x.shape):
        # d logp / dz = onehot - softmax(z), z = x / T
        direct = out.dtype == torch.float32
        p = torch.sub(x[s].float(), lse[s, None] / inv_temperature, out=out[s] if direct else None)
        p.mul_(inv_temperature).exp_().mul_(-g[s, None])
        if not direct:
            out[s] = p
    return out.scatter_add_(1, y, g[:, None].to(out.dtype))


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[label] with a hand-written, chunked backward.

    Autograd through ``gather - logsumexp(logits / T)`` keeps the scaled copy of the logits
    and builds the gradient from four full-size temporaries; here the forward keeps only the
    per-row logsumexp and the backward writes ``(onehot - softmax) / T`` once, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
        x = logits.reshape(-1, logits.shape[-1])                      # (N, V)
        y = labels.reshape(-1, 1).long()                              # (N, 1)
        inv = 1.0 / temperature
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for s in _row_chunks(*x.shape):
            lse[s] = _chunk_logsumexp(x[s], inv, False)[0]
        picked = x.gather(1, y).squeeze(1).float() * inv
        ctx.save_for_backward(logits, y, lse)
        ctx.inv = inv
        return (picked - lse).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, y, lse = ctx.saved_tensors
        inv = ctx.inv
        x = logits.reshape(-1, logits.shape[-1])
        g = grad_out.reshape(-1).float() * inv                        # (N,) dL/dz at the label
        grad = _logprob_grad(x, lse, inv, g, y, torch.empty_like(x))
        return grad.view(logits.shape), None, None


class Workspace:
    """Reusable float32 buffers for the (N, V) logits of ``logprobs_from_hidden``.

    A fresh 100 MB tensor costs more in page faults than the matmul that fills it saves on
    CPU; the logits buffer of one forward becomes its gradient in the backward and then
    returns here for the next call.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.free: list[Tensor] = []

    def take(self, rows: int, cols: int, device: torch.device) -> Tensor:
        need = rows * cols
        for i, buf in enumerate(self.free):
            if buf.numel() >= need and buf.device == device:
                return self.free.pop(i)[:need].view(rows, cols)
        return torch.empty(rows, cols, dtype=torch.float32, device=device)

    def give(self, buf: Tensor) -> None:
        if self.keep <= 0:
            return
        base = buf._base if buf._base is not None else buf
        self.free = sorted([*self.free, base.view(-1)], key=Tensor.numel)[-self.keep:]


class _HiddenLogprobs(torch.autograd.Function):
    """Output head and log-prob of the label in one op: ``hidden @ weight.T (+ bias)``, then
    ``log softmax(logits / T)[label]``. The logits live in one workspace buffer, which the
    backward overwrites with the logits' gradient before the two matmuls that consume it.
    Returns ``(logp, entropy)``; the entropy (zeros unless asked for) has no gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                temperature: float, workspace: Workspace, with_entropy: bool):
        n, v = hidden.shape[0], weight.shape[0]
        logits = workspace.take(n, v, hidden.device)                   # (N, V)
        torch.mm(hidden.float(), weight.float().t(), out=logits)
        if bias is not None:
            logits += bias.float()
        inv = 1.0 / temperature
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros_like(lse)
        for s in _row_chunks(n, v):
            lse[s], h = _chunk_logsumexp(logits[s], inv, with_entropy)
            if h is not None:
                entropy[s] = h
        y = labels.reshape(-1, 1).long()
        logp = logits.gather(1, y).squeeze(1) * inv - lse
        ctx.mark_non_differentiable(entropy)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(hidden, weight, bias, y, lse)
            ctx.logits, ctx.inv, ctx.workspace = logits, inv, workspace
        else:
            workspace.give(logits)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor | None):
        hidden, weight, bias, y, lse = ctx.saved_tensors
        grad, inv = ctx.logits, ctx.inv
        ctx.logits = None
        _logprob_grad(grad, lse, inv, grad_out.float() * inv, y, out=grad)  # in place
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.mm(grad, weight.float()).to(hidden.dtype)      # (N, d)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad.t(), hidden.float()).to(weight.dtype)  # (V, d)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(bias.dtype)
        ctx.workspace.give(grad)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def logprobs_from_hidden(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         temperature: float = 1.0, workspace: Workspace | None = None,
                         with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """``logprobs_from_logits(hidden @ weight.T + bias, labels, temperature)`` as one op, and
    optionally ``entropy_from_logits`` of the same logits (without gradient).

    Args:
        hidden: ``(N, d)`` final hidden states.
        weight: ``(V, d)`` output head; ``bias`` ``(V,)`` or None.
        labels: ``(N,)`` long.

    Returns:
        ``(logp, entropy)``: ``(N,)`` float32 log-probs, differentiable with respect to
        hidden, weight and bias; ``(N,)`` entropies or None.
    """
    logp, entropy = _HiddenLogprobs.apply(hidden, weight, bias, labels, float(temperature),
                                          workspace or Workspace(keep=0), with_entropy)
    return logp, (entropy if with_entropy else None)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``(..., V)``.
        labels: ``(...)`` long.
        temperature: must match the sampling temperature, otherwise the PPO
            ratio compares against a different distribution than the one sampled.

    Returns:
        ``(...)`` float32, differentiable with respect to ``logits``.
    """
    # float32 inside: bf16 logsumexp over a 100k+ vocabulary loses several bits, and the
    # PPO ratio exp(logp - old_logp) amplifies that error.
    return _TokenLogprobs.apply(logits, labels, float(temperature))


def logprobs_and_entropy(logits: Tensor, labels: Tensor,
                         temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``logprobs_from_logits`` and ``entropy_from_logits`` in one pass, without gradients.

    For rollouts, where both are read from the same logits and nothing is differentiated.
    """
    with torch.no_grad():
        x = logits.reshape(-1, logits.shape[-1])
        inv = 1.0 / temperature
        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        entropy = torch.empty_like(lse)
        for s in _row_chunks(*x.shape):
            lse[s], entropy[s] = _chunk_logsumexp(x[s], inv, True)
        picked = x.gather(1, labels.reshape(-1, 1).long()).squeeze(1).float() * inv
        return (picked - lse).view(labels.shape), entropy.view(labels.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position (differentiable).

    Args:
        logits: ``(..., V)``.

    Returns:
        ``(...)`` float32.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    # H = logsumexp(z) - E_p[z]; avoids log(p) of underflowed probabilities. A -inf logit has
    # p = 0: it is replaced by 0 inside the product (before it, so that neither the value nor
    # the gradient meets 0 * -inf).
    p = torch.softmax(z, dim=-1)
    finite_z = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    return torch.logsumexp(z, dim=-1) - (p * finite_z).sum(dim=-1)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-sample estimate of KL(pi || ref) from tokens sampled from pi.

    Args:
        logp: log pi(token), any shape.
        ref_logp: log ref(token), same shape.
        kind: ``"k1"`` (unbiased, can be negative), ``"k2"`` (biased, low variance,
            >= 0) or ``"k3"`` (unbiased, >= 0).

    Returns:
        Same shape as ``logp``.  Not clamped: clamping would bias the estimate.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # With r = ref/pi: (r - 1) - log r, which is >= 0 since log r <= r - 1.
        neg = -log_ratio
        return torch.expm1(neg) - neg
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def _token_kl(logp: Tensor, ref_logp: Tensor, valid: Tensor, kind: str) -> Tensor:
    kl = kl_estimate(logp, ref_logp, kind)
    return torch.where(valid, kl, torch.zeros_like(kl))


def kl_penalty_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: str = "k3") -> Tensor:
    """The KL to the reference as a loss term: the token mean of ``kl_estimate(kind)``.

    Differentiated through ``logp`` on tokens sampled from the policy, k2 gives the gradient
    of KL(pi || ref), ``(logp - ref_logp) * grad logp``; k3 gives ``(1 - ref / pi) * grad
    logp``, whose expectation is the gradient of KL(ref || pi) (GRPO's choice, also a leash);
    k1 gives ``grad logp``, zero in expectation, which is why the config refuses it here.

    Args:
        logp: ``(B, T)`` current policy log-probs (with grad).
        ref_logp: ``(B, T)`` reference log-probs of the same tokens.
        mask: ``(B, T)``.

    Returns:
        scalar.
    """
    return masked_mean(kl_estimate(logp, ref_logp, kind), mask)


# ------------------------------------------------------------------------------ PPO


def kl_shaped_rewards(
    score: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: float,
    kl_kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward: ``-beta * KL`` everywhere, plus the sequence score at the end.

    Args:
        score: ``(B,)`` reward-model score of each full response.
        logp: ``(B, T)`` policy log-probs of the sampled tokens.
        ref_logp: ``(B, T)`` reference-model log-probs of the same tokens.
        mask: ``(B, T)`` response mask.
        beta: KL coefficient.
        kl_kind: estimator passed to :func:`kl_estimate`.

    Returns:
        rewards: ``(B, T)``, 0 past the response.
        kl: ``(B, T)`` per-token KL estimate, 0 past the response.
    """
    valid = _as_bool(mask)
    kl = _token_kl(logp, ref_logp, valid, kl_kind)
    rewards = -beta * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    end = last_index(valid)  # (B,)
    # A row with no valid token has nowhere to put its score; dropping it keeps the
    # "0 past the response" invariant instead of writing into padding.
    has_tokens = valid.any(dim=-1)
    bonus = torch.where(has_tokens, score.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rewards = rewards.index_put((rows, end), bonus, accumulate=True)
    return rewards, kl


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, computed backwards over time.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, where ``t+1`` is the next *valid*
    position and the value after the last valid token is 0 (the episode ends at
    EOS or at max length).

    Args:
        rewards: ``(B, T)``.
        values: ``(B, T)`` value-head predictions.
        mask: ``(B, T)``; invalid positions are skipped, so they neither receive
            advantage nor feed value/advantage into valid neighbours.

    Returns:
        advantages: ``(B, T)``, 0 at invalid positions.
        returns: ``(B, T)`` = advantages + values (before any whitening), the
            value-function target; 0 at invalid positions.
    """
    valid = _as_bool(mask)
    zeros = torch.zeros_like(values[:, 0])  # (B,)
    next_value = zeros
    next_adv = zeros
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = valid[:, t]
        r_t = torch.where(m, rewards[:, t], zeros)
        v_t = torch.where(m, values[:, t], zeros)
        delta = r_t + gamma * next_value - v_t
        adv_t = delta + gamma * lam * next_adv
        adv_t = torch.where(m, adv_t, zeros)
        advantages[:, t] = adv_t
        # Only a valid step becomes "the next step" of the one before it; this makes
        # padding transparent wherever it sits (right, left or inside the row).
        next_value = torch.where(m, v_t, next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = sum_{t' >= t} gamma^(t' - t) r_t'`` over the valid positions of each row.

    This is :func:`gae` with every value 0 and ``lambda = 1`` (``delta_t = r_t``), so padding
    is skipped the same way.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        mask: ``(B, T)``.

    Returns:
        ``(B, T)``, 0 at invalid positions.
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return returns


def _groups(rewards: Tensor, group_size: int, valid: Tensor | None):
    """``(G, k)`` views of the rewards (float64) and of which responses count, the number
    that count per group, and whether the group has any spread at all."""
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    r = rewards.detach().to(torch.float64).reshape(-1, group_size)
    v = (torch.ones_like(r, dtype=torch.bool) if valid is None
         else _as_bool(valid).reshape(-1, group_size))
    n = v.sum(dim=1, keepdim=True)                                         # (G, 1)
    top = torch.where(v, r, -torch.inf).amax(dim=1, keepdim=True)
    bottom = torch.where(v, r, torch.inf).amin(dim=1, keepdim=True)
    # Equal rewards carry no signal: their advantages are exactly 0, not the rounding error of
    # r - mean (which the std division would then blow up).
    informative = v & (n >= 2) & (top > bottom)                            # (G, k)
    return r, v, n, informative


def rloo_advantages(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out: each response's reward minus the mean of its group's others,
    ``A_i = r_i - sum_{j != i} r_j / (n - 1)`` (= ``n / (n - 1) * (r_i - mean)``).

    Args:
        rewards: ``(B,)`` sequence rewards; rows ``g*k .. g*k + k - 1`` answer prompt ``g``.
        group_size: ``k``, responses per prompt.
        valid: ``(B,)`` bool, the responses that count; the others get 0 and are left out of
            their group's baseline (``n`` is the number that count). None: all count.

    Returns:
        ``(B,)`` in ``rewards``' dtype; 0 in a group with fewer than two valid responses.
    """
    r, v, n, informative = _groups(rewards, group_size, valid)
    total = torch.where(v, r, 0.0).sum(dim=1, keepdim=True)
    others = (total - r) / (n - 1).clamp(min=1)
    adv = torch.where(informative, r - others, 0.0)
    return adv.reshape(-1).to(rewards.dtype)


def grpo_advantages(rewards: Tensor, group_size: int, std_normalize: bool = True,
                    valid: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantage ``(r_i - mean) / (std + eps)``, or ``r_i - mean`` with
    ``std_normalize=False`` (Dr. GRPO). The std is the unbiased one of the group's valid
    rewards, as in DeepSeekMath's implementations (torch.std in OpenRLHF and veRL).

    Args and returns as :func:`rloo_advantages`.
    """
    r, v, n, informative = _groups(rewards, group_size, valid)
    mean = torch.where(v, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(v, r - mean, 0.0)
    if std_normalize:
        var = (centred * centred).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        centred = centred / (var.sqrt() + eps)
    adv = torch.where(informative, centred, 0.0)
    return adv.reshape(-1).to(rewards.dtype)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective, as a loss to minimise.

    ``L = mean_valid max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))`` with
    ``rho = exp(logp - old_logp)``.

    Args:
        logp: ``(B, T)`` current policy log-probs (with grad).
        old_logp: ``(B, T)`` log-probs at rollout time.
        advantages: ``(B, T)``.
        mask: ``(B, T)``.
        clip_range: ``eps``.

    Returns:
        loss: scalar.
        stats: detached scalars ``clipfrac``, ``approxkl``, ``ratio``.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss.

    ``0.5 * mean_valid max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clip(V - V_old, -c, c)``: the value head cannot profit from
    moving further than ``c`` from its rollout-time prediction in one update.

    Args:
        values: ``(B, T)`` current predictions (with grad).
        old_values: ``(B, T)`` predictions at rollout time.
        returns: ``(B, T)`` targets from :func:`gae`.
        mask: ``(B, T)``.
        clip_range: ``c`` (in reward units).

    Returns:
        loss: scalar.
        stats: detached scalars ``clipfrac``, ``error``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_unclipped = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((err_clipped > err_unclipped).float(), mask),
            "error": masked_mean(err_unclipped, mask),
        }
    return loss, stats


def lagrangian_advantages(reward_adv: Tensor, cost_adv: Tensor, lam: float) -> Tensor:
    """Safe-RLHF combined advantage ``(A_r - lambda * A_c) / (1 + lambda)``.

    Dividing by ``1 + lambda`` keeps the advantage scale (hence the effective step
    size) roughly constant as lambda grows.
    """
    return (reward_adv - lam * cost_adv) / (1.0 + lam)


@dataclass
class Advantages:
    """What the PPO update trains on, from one batch of scored rollouts."""

    advantages: Tensor    # (B, T) policy advantages (combined with the cost, whitened)
    returns: Tensor       # (B, T) value targets of the reward critic
    cost_returns: Tensor  # (B, T) value targets of the cost critic (zeros without costs)
    kl: Tensor            # (B, T) per-token KL estimate, 0 past the response
    sequence_kl: Tensor   # (B,) KL of each response: the per-token KL summed over its tokens


def ppo_advantages(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    beta: float,
    kl_kind: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
    costs: Tensor | None = None,
    cost_values: Tensor | None = None,
    multiplier: float = 0.0,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Advantages:
    """KL-shaped rewards, GAE and whitening: the step between scoring a batch and training on it.

    Args:
        scores: ``(B,)`` sequence scores (normalized reward, rules, penalties).
        logp, ref_logp: ``(B, T)`` policy and reference log-probs of the sampled tokens.
        values: ``(B, T)`` reward critic's values.
        mask: ``(B, T)`` response mask (1 up to and including the first EOS).
        beta: KL coefficient.
        whiten_rewards: rescale the per-token rewards (mean kept) before GAE; with costs,
            each stream by its own scale.
        whiten_advantages: normalize the final advantages over all valid tokens.
        costs, cost_values: ``(B,)`` constrained costs and ``(B, T)`` cost critic values
            (PPO-Lagrangian); None for plain PPO.
        multiplier: the Lagrange multiplier lambda.
        all_reduce: sums whitening moments across processes (see :func:`masked_whiten`).

    With costs, as in Safe RLHF's PPO-Lagrangian, the KL penalty enters both streams: the
    reward stream gets ``-beta * KL`` and the cost stream ``+beta * KL``, so the combined
    advantage ``(A_r - lambda * A_c) / (1 + lambda)`` is the advantage of
    ``(score - lambda * cost) / (1 + lambda) - beta * KL``: the leash keeps its weight beta
    whatever lambda is, instead of shrinking to ``beta / (1 + lambda)``. Unlike safe-rlhf,
    the per-token rewards are not clipped (the caller clips the normalized score), and the
    combined advantage is whitened like any other, which rescales all three terms alike.
    Returns (value targets) are ``A + V`` from GAE, before any whitening.
    """
    rewards, kl = kl_shaped_rewards(scores, logp, ref_logp, mask, beta, kl_kind)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    cost_returns = torch.zeros_like(returns)
    if costs is not None:
        if cost_values is None:
            raise ValueError("ppo_advantages: costs given without cost_values")
        cost_rewards, _ = kl_shaped_rewards(costs, logp, ref_logp, mask, -beta, kl_kind)
        if whiten_rewards:
            cost_rewards = masked_whiten(cost_rewards, mask, shift_mean=False,
                                         all_reduce=all_reduce)
        cost_advantages, cost_returns = gae(cost_rewards, cost_values, mask, gamma, lam)
        advantages = lagrangian_advantages(advantages, cost_advantages, multiplier)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return Advantages(advantages, returns, cost_returns, kl, masked_sum(kl, mask, dim=1))


def critic_free_advantages(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    estimator: str,
    group_size: int = 1,
    beta: float,
    kl_kind: str = "k1",
    gamma: float = 1.0,
    std_normalize: bool = True,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Advantages:
    """Advantages without a critic, the counterpart of :func:`ppo_advantages`.

    Args:
        scores: ``(B,)`` sequence scores; with a group estimator rows ``g*k .. g*k + k - 1``
            are the ``k = group_size`` responses to prompt ``g``.
        logp, ref_logp: ``(B, T)`` policy and reference log-probs of the sampled tokens.
        mask: ``(B, T)`` response mask; a row with no valid token gets no advantage and is
            left out of its group's baseline.
        estimator: ``"rloo"`` or ``"grpo"``: the response's reward ``score - beta * sum_t KL_t``
            (the KL summed over its tokens, as in Ahmadian et al. and TRL's RLOO) against its
            group (:func:`rloo_advantages`, :func:`grpo_advantages`), the same advantage on
            every token. ``"reinforce_pp"``: REINFORCE++, the per-token reward of
            :func:`kl_shaped_rewards`, its :func:`reward_to_go` with ``gamma``, whitened over
            the batch (``whiten_advantages``; across processes with ``all_reduce``).
        beta: KL coefficient in the reward; 0 when the KL is a loss term instead.
        std_normalize: grpo divides by the group std.
        whiten_rewards: reinforce_pp rescales the per-token rewards first (mean kept).

    Group statistics stay within a process: each one samples its own prompts' k responses.
    ``returns`` and ``cost_returns`` are zeros: there is no value function to fit.
    """
    valid = _as_bool(mask)
    if estimator == "reinforce_pp":
        rewards, kl = kl_shaped_rewards(scores, logp, ref_logp, mask, beta, kl_kind)
        if whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
        advantages = reward_to_go(rewards, mask, gamma)
        if whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    elif estimator in ("rloo", "grpo"):
        kl = _token_kl(logp, ref_logp, valid, kl_kind)
        reward = scores.to(kl.dtype) - beta * kl.sum(dim=1)          # (B,)
        rows = valid.any(dim=1)
        if estimator == "rloo":
            per_response = rloo_advantages(reward, group_size, rows)
        else:
            per_response = grpo_advantages(reward, group_size, std_normalize, rows)
        advantages = torch.where(valid, per_response[:, None].expand_as(kl),
                                 torch.zeros_like(kl))
    else:
        raise ValueError(f"unknown critic-free estimator {estimator!r}; expected rloo, grpo "
                         "or reinforce_pp")
    zeros = torch.zeros_like(advantages)
    return Advantages(advantages, zeros, zeros, kl, masked_sum(kl, mask, dim=1))


# --------------------------------------------------------------------- reward model


def bradley_terry_pairs(ranks: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """All preference pairs implied by per-prompt rankings.

    Args:
        ranks: ``G`` groups; ``ranks[g][k]`` is the rank of response ``k`` of prompt
            ``g`` (lower is better).  Group ``g``'s responses sit at consecutive flat
            indices starting at ``sum(len(ranks[h]) for h < g)``.

    Returns:
        chosen_idx: ``(P,)`` long, flat index of the preferred response.
        rejected_idx: ``(P,)`` long.
        pair_weight: ``(P,)`` float, ``1 / pairs_in_group / groups_with_pairs``, so
            that the weighted sum of per-pair losses is the mean over prompts of each
            prompt's mean pair loss (InstructGPT: a prompt counts once whatever its K,
            instead of K-choose-2 times).  Tied responses form no pair.
    """
    chosen: list[int] = []
    rejected: list[int] = []
    group_sizes: list[int] = []
    offset = 0
    for group in ranks:
        n_before = len(chosen)
        for i, rank_i in enumerate(group):
            for j, rank_j in enumerate(group):
                if rank_i < rank_j:
                    chosen.append(offset + i)
                    rejected.append(offset + j)
        n_pairs = len(chosen) - n_before
        if n_pairs:
            group_sizes.append(n_pairs)
        offset += len(group)
    n_groups = len(group_sizes)
    weights = [1.0 / n / n_groups for n in group_sizes for _ in range(n)]
    return (
        torch.tensor(chosen, dtype=torch.long),
        torch.tensor(rejected, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
    )


def best_worst_pairs(ranks: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Per prompt, its best response against its worst, in ``bradley_terry_pairs``' flat
    indexing.

    Returns ``(chosen_idx, rejected_idx)``, ``(P,)`` long each, one pair per group whose ranks
    are not all equal. A tie for best or for worst takes the earliest of the tied responses.
    Noisy annotators rarely swap the two ends of a ranking (a swap of adjacent responses never
    does once ``K >= 3``), so this pair is the ranking's most reliable one.
    """
    chosen: list[int] = []
    rejected: list[int] = []
    offset = 0
    for group in ranks:
        group = list(group)
        if group and min(group) < max(group):
            chosen.append(offset + group.index(min(group)))
            rejected.append(offset + group.index(max(group)))
        offset += len(group)
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def bradley_terry_loss(
    rewards: Tensor,
    chosen_idx: Tensor,
    rejected_idx: Tensor,
    pair_weight: Tensor | None = None,
    margin: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry negative log-likelihood ``-log sigmoid(r_c - r_r - margin)``.

    Args:
        rewards: ``(N,)`` scalar reward of every response in the batch.
        chosen_idx: ``(P,)`` long.
        rejected_idx: ``(P,)`` long.
        pair_weight: ``(P,)``; if given the loss is ``sum(w * l)`` (weights from
            :func:`bradley_terry_pairs` sum to 1), otherwise the plain mean.
        margin: required reward gap (Llama-2 style); 0 gives plain Bradley-Terry.

    Returns:
        loss: scalar.
        stats: detached ``accuracy`` (fraction of pairs with ``r_c > r_r``
            strictly, so a constant reward model scores 0) and ``margin`` (mean
            ``r_c - r_r``).
    """
    if chosen_idx.numel() == 0:
        # Keep the graph connected so every rank still runs backward under DDP.
        zero = rewards.sum() * 0.0
        return zero, {"accuracy": zero.detach(), "margin": zero.detach()}
    diff = rewards[chosen_idx] - rewards[rejected_idx]  # (P,)
    per_pair = -F.logsigmoid(diff - margin)
    if pair_weight is None:
        loss = per_pair.mean()
    else:
        loss = (pair_weight.to(per_pair) * per_pair).sum()
    with torch.no_grad():
        stats = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, stats


def expected_calibration_error(
    probs: Tensor, correct: Tensor, n_bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error with equal-width confidence bins on [0, 1].

    Args:
        probs: ``(N,)`` predicted probability that the prediction is correct
            (for a reward model: ``sigmoid(r_c - r_r)``).
        correct: ``(N,)`` bool, whether it was.
        n_bins: number of bins; bin ``b`` is ``[b/n, (b+1)/n)``, the last one
            also includes 1.0.

    Returns:
        ece: ``sum_b count_b / N * |acc_b - conf_b|`` (0.0 for empty input).
        bins: one dict per bin with ``lo``, ``hi``, ``count``, ``confidence``
            (mean prob) and ``accuracy``; empty bins report 0.0 for both means.
    """
    p = probs.detach().to(torch.float64).flatten()
    c = correct.detach().to(torch.float64).flatten()
    n = p.numel()
    idx = torch.clamp((p * n_bins).floor().long(), 0, n_bins - 1)
    ece = 0.0
    bins: list[dict[str, float]] = []
    for b in range(n_bins):
        in_bin = idx == b
        count = int(in_bin.sum())
        conf = float(p[in_bin].mean()) if count else 0.0
        acc = float(c[in_bin].mean()) if count else 0.0
        if count:
            ece += count / n * abs(acc - conf)
        bins.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return ece, bins


# ------------------------------------------------------------------ KL / Lagrangian


class FixedKLController:
    """Constant KL coefficient ``beta``."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op, present so callers need not special-case the fixed controller."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (section 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``;  ``beta <- beta * (1 + e * n_steps / horizon)``.
    The clip bounds how fast beta can move when the measured KL is far off target.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


class LagrangeMultiplier:
    """PPO-Lagrangian multiplier of Safe RLHF for the constraint ``J_c <= threshold``.

    Projected gradient ascent of ``lambda * (J_c - threshold)`` in lambda: lambda
    grows while the mean cost exceeds the threshold and shrinks otherwise, kept in
    ``[0, max_value]`` (non-negative by KKT; capped so reward is never ignored entirely).

    Deliberately unlike safe-rlhf, which steps ``log lambda`` by SGD (a step proportional to
    lambda) on a moving window of episode costs, before using lambda on the same batch: here
    the step is additive, so lambda reaches 0 when the constraint is slack instead of only
    decaying towards it, ``lambda_lr`` is in cost units, and each batch's cost moves the
    lambda used from the next batch on (``J_c`` is that batch's mean over all processes).
    """

    def __init__(
        self,
        init: float = 1.0,
        lr: float = 0.1,
        max_value: float = 5.0,
        threshold: float = 0.0,
    ) -> None:
        self.lr = float(lr)
        self.max_value = float(max_value)
        self.threshold = float(threshold)
        self.value = min(max(float(init), 0.0), self.max_value)

    def update(self, mean_cost: float) -> float:
        """Take one ascent step given the batch's mean episode cost; return new lambda."""
        stepped = self.value + self.lr * (float(mean_cost) - self.threshold)
        self.value = min(max(stepped, 0.0), self.max_value)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "lr": self.lr,
            "max_value": self.max_value,
            "threshold": self.threshold,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.lr = float(state.get("lr", self.lr))
        self.max_value = float(state.get("max_value", self.max_value))
        self.threshold = float(state.get("threshold", self.threshold))

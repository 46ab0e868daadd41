"""Unit tests for stages/ops.py against values worked out by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

# The repository root is not installed into the venv; make `stages` importable when
# pytest is run as `.venv/bin/pytest` from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import stages.ops as ops_module  # noqa: E402
from stages.ops import (  # noqa: E402
    AdaptiveKLController,
    FixedKLController,
    LagrangeMultiplier,
    Workspace,
    best_worst_pairs,
    bradley_terry_loss,
    bradley_terry_pairs,
    entropy_from_logits,
    expected_calibration_error,
    first_true_index,
    gae,
    kl_estimate,
    kl_shaped_rewards,
    lagrangian_advantages,
    last_index,
    logprobs_and_entropy,
    logprobs_from_hidden,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    ppo_advantages,
    response_mask_after_eos,
    value_loss,
)

torch.set_num_threads(1)


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-5) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected_t, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- masks


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean() -> None:
    # valid entries: 1, 2, 4
    close(masked_sum(X, M), 7.0)  # 1 + 2 + 4
    close(masked_sum(X, M, dim=1), [3.0, 4.0])  # [1 + 2, 4]
    close(masked_mean(X, M), 7.0 / 3.0)  # (1 + 2 + 4) / 3
    close(masked_mean(X, M, dim=1), [1.5, 4.0])  # [(1 + 2) / 2, 4 / 1]
    # column 2 has no valid entry -> 0 rather than nan
    close(masked_mean(X, M, dim=0), [2.5, 2.0, 0.0])  # [(1 + 4) / 2, 2 / 1, 0]
    close(masked_mean(X, M.bool()), 7.0 / 3.0)


def test_masked_mean_ignores_nan_padding() -> None:
    x = torch.tensor([1.0, float("nan"), float("inf")])
    m = torch.tensor([1.0, 0.0, 0.0])
    close(masked_mean(x, m), 1.0)
    close(masked_sum(x, m), 1.0)


WX = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
WM = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_masked_whiten() -> None:
    # valid 1,2,3,4: mean 2.5, unbiased var 5/3 -> std = sqrt(5/3) = 1.290994
    s = math.sqrt(5.0 / 3.0)
    expected = [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]]
    # = [[-1.161895, -0.387298, 0], [0.387298, 1.161895, 0]]; padding -> 0
    close(masked_whiten(WX, WM), expected)
    out = masked_whiten(WX, WM)
    close(masked_mean(out, WM), 0.0)
    close(out[WM.bool()].var(), 1.0)  # unbiased, as the whitening's own variance


def test_masked_whiten_keep_mean() -> None:
    # shift_mean=False: (x - 2.5) / std + 2.5, padding still 0
    s = math.sqrt(5.0 / 3.0)
    expected = [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 0.0], [2.5 + 0.5 / s, 2.5 + 1.5 / s, 0.0]]
    close(masked_whiten(WX, WM, shift_mean=False), expected)


def test_masked_whiten_all_reduce() -> None:
    # Fake all-reduce over two identical ranks: moments double.
    # local [sum, sum_sq, count] = [10, 30, 4] -> global [20, 60, 8]
    seen: list[torch.Tensor] = []

    def fake_all_reduce(moments: torch.Tensor) -> torch.Tensor:
        seen.append(moments.clone())
        return moments * 2

    out = masked_whiten(WX, WM, all_reduce=fake_all_reduce)
    close(seen[0], [10.0, 30.0, 4.0])
    # global mean 20/8 = 2.5 (same as local); biased var 60/8 - 2.5^2 = 1.25;
    # unbiased over the 8 global samples: 1.25 * 8/7 = 10/7 (vs 5/3 locally)
    s = math.sqrt(10.0 / 7.0)
    close(out, [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]])
    # ...which is exactly what a single process holding both copies computes.
    both = masked_whiten(torch.cat([WX, WX]), torch.cat([WM, WM]))
    close(out, both[:2])


# ------------------------------------------------------------------ log-probabilities


def test_logprobs_by_hand() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25)]])
    # T = 2: logits / 2 = [0, ln(3)/2] -> exp = [1, sqrt 3] -> p1 = sqrt3 / (1 + sqrt3)
    r3 = math.sqrt(3.0)
    expected = [[math.log(r3 / (1 + r3)), math.log(1 / (1 + r3))]]  # [-0.4587, -1.0053]
    close(logprobs_from_logits(logits, labels, temperature=2.0), expected)


def test_logprobs_match_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (2, 5), generator=g)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        close(logprobs_from_logits(logits, labels, temperature=temp), ref.tolist())
    # bf16 input is upcast, result is float32
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32


def reference_logprobs(logits: torch.Tensor, labels: torch.Tensor, temp: float) -> torch.Tensor:
    z = logits.float() / temp
    return torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows over an 11-token vocabulary: the chunk loops run several times."""
    monkeypatch.setattr(ops_module, "_CHUNK_ELEMENTS", 33)


def test_logprobs_gradient_matches_autograd(small_chunks) -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g)
    ref_logits = logits.detach().clone().requires_grad_(True)
    (logprobs_from_logits(logits, labels, 0.7) * weights).sum().backward()
    (reference_logprobs(ref_logits, labels, 0.7) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-6, rtol=1e-5)
    # bf16 logits: gradient in bf16, computed in float32
    low = logits.detach().bfloat16().requires_grad_(True)
    (logprobs_from_logits(low, labels, 0.7) * weights).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), ref_logits.grad, atol=0.02, rtol=0.02)


def test_logprobs_and_entropy_in_one_pass(small_chunks) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 11, generator=g) * 2
    labels = torch.randint(0, 11, (3, 4), generator=g)
    logp, entropy = logprobs_and_entropy(logits, labels, 1.3)
    close(logp, reference_logprobs(logits, labels, 1.3).tolist())
    close(entropy, entropy_from_logits(logits, 1.3).tolist())


def test_logprobs_from_hidden_matches_head_then_logprobs(small_chunks) -> None:
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(7, 5, generator=g)
    weight = torch.randn(11, 5, generator=g)
    bias = torch.randn(11, generator=g)
    labels = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, generator=g)
    workspace = Workspace()
    for b in (None, bias):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
        ref = [t.clone().requires_grad_(True) for t in (hidden, weight)]
        b1 = b2 = None
        if b is not None:
            b1, b2 = b.clone().requires_grad_(True), b.clone().requires_grad_(True)
        logp, entropy = logprobs_from_hidden(*leaves, b1, labels, 0.8, workspace,
                                             with_entropy=True)
        logits = torch.nn.functional.linear(ref[0], ref[1], b2)
        expected = reference_logprobs(logits, labels, 0.8)
        torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
        close(entropy, entropy_from_logits(logits.detach(), 0.8).tolist())
        assert not entropy.requires_grad
        (logp * upstream).sum().backward()
        (expected * upstream).sum().backward()
        for mine, theirs in zip(leaves + [b1], ref + [b2]):
            if mine is not None:
                torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    # the logits buffer went back to the workspace and is reused by the next call
    assert len(workspace.free) == 1
    kept = workspace.free[0].data_ptr()
    with torch.no_grad():
        logprobs_from_hidden(hidden, weight, None, labels, 1.0, workspace)
    assert [buf.data_ptr() for buf in workspace.free] == [kept]


def test_workspace_keeps_the_largest_buffers() -> None:
    workspace = Workspace(keep=2)
    for rows in (1, 3, 2):
        workspace.give(torch.empty(rows, 4))
    assert sorted(b.numel() for b in workspace.free) == [8, 12]
    assert workspace.take(2, 4, torch.device("cpu")).shape == (2, 4)  # fits in a kept one
    assert len(workspace.free) == 1
    assert Workspace(keep=0).free == []


def test_entropy() -> None:
    # uniform over 4 -> ln 4 = 1.386294; [1/4, 3/4] -> -(.25 ln .25 + .75 ln .75) = 0.562335
    logits = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(logits), [[math.log(4.0), h]])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 7, generator=g)
    p = torch.softmax(z / 1.5, -1)
    close(entropy_from_logits(z, temperature=1.5), (-(p * p.log()).sum(-1)).tolist())


def test_entropy_with_masked_tokens_is_finite() -> None:
    # A -inf logit has probability 0 and contributes nothing: [0, ln 3, -inf] is the
    # [1/4, 3/4] case above, whatever path computes it.
    inf = float("inf")
    logits = torch.tensor([[0.0, math.log(3.0), -inf], [2.0, -inf, -inf]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    z = logits.clone().requires_grad_(True)
    entropy = entropy_from_logits(z)
    close(entropy, [h, 0.0])
    entropy.sum().backward()
    assert torch.isfinite(z.grad).all()
    close(logprobs_and_entropy(logits, torch.tensor([1, 0]))[1], [h, 0.0])
    # The fused head: a -inf bias masks the last token of the vocabulary.
    hidden = torch.tensor([[0.0, math.log(3.0), 0.0], [2.0, 2.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, -inf])
    _, fused = logprobs_from_hidden(hidden, torch.eye(3), bias, torch.tensor([1, 0]),
                                    with_entropy=True)
    close(fused, [h, math.log(2.0)])


def test_kl_estimators_by_hand() -> None:
    # row 0: pi = 0.5, ref = 0.25; row 1: pi = 0.25, ref = 0.5
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    ln2 = math.log(2.0)
    close(kl_estimate(logp, ref, "k1"), [ln2, -ln2])  # log(pi/ref) = [0.6931, -0.6931]
    close(kl_estimate(logp, ref, "k2"), [0.5 * ln2**2] * 2)  # 0.5 * 0.6931^2 = 0.2402
    # k3 = r - 1 - ln r with r = ref/pi: r = 1/2 -> -0.5 + ln 2 = 0.1931; r = 2 -> 1 - ln 2
    close(kl_estimate(logp, ref, "k3"), [ln2 - 0.5, 1.0 - ln2])
    assert kl_estimate(logp, ref).tolist() == kl_estimate(logp, ref, "k1").tolist()


def test_kl_estimators_not_clamped_and_k3_nonnegative() -> None:
    g = torch.Generator().manual_seed(2)
    logp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()  # k1 keeps its sign
    # log(ref/pi) = 30: k3 = e^30 - 1 - 30, no clamp to a "safe" range
    f64 = torch.float64
    big = kl_estimate(torch.tensor(-30.0, dtype=f64), torch.tensor(0.0, dtype=f64), "k3")
    assert big.item() == pytest.approx(math.exp(30.0) - 31.0, rel=1e-12)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


# ------------------------------------------------------------------------- response masks


def test_first_true_index_and_last_index() -> None:
    m = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_index(m).tolist() == [1, 3, 0]  # no True -> T = 3
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert last_index(mask).tolist() == [1, 3, 0, 2]  # empty row clamps to 0


def test_response_mask_after_eos() -> None:
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, has_eos, lengths = response_mask_after_eos(tokens, eos_token_id=2)
    # row 0: EOS at 1 (the second 2 is after it); row 1: no EOS -> all valid
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert mask.dtype == torch.float32
    assert has_eos.tolist() == [True, False, True]
    assert lengths.tolist() == [2, 4, 1]
    mask, has_eos, lengths = response_mask_after_eos(tokens, eos_token_id=[2, 7])
    assert mask[1].tolist() == [1, 1, 1, 0]  # 7 at index 2 now stops row 1
    assert has_eos.tolist() == [True, True, True]
    assert lengths.tolist() == [2, 3, 1]


# ------------------------------------------------------------------------------ PPO


def test_kl_shaped_rewards() -> None:
    score = torch.tensor([10.0, 20.0])
    logp = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1]])
    ref = torch.tensor([[0.3, 0.2, 0.0], [0.0, 0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = kl_shaped_rewards(score, logp, ref, mask, beta=0.1)
    # k1 = logp - ref: row 0 [0.2, 0.0, (masked)], row 1 [0.1, -0.2, 0.1]
    close(kl, [[0.2, 0.0, 0.0], [0.1, -0.2, 0.1]])
    # -0.1 * kl, score added at the last valid index (row 0: t=1, row 1: t=2)
    # row 0: [-0.02, -0.0 + 10, 0]; row 1: [-0.01, 0.02, -0.01 + 20]
    close(rewards, [[-0.02, 10.0, 0.0], [-0.01, 0.02, 19.99]])


def test_kl_shaped_rewards_k3_and_empty_row() -> None:
    logp = torch.tensor([[math.log(0.5), 0.0], [0.0, 0.0]])
    ref = torch.tensor([[math.log(0.25), 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    rewards, kl = kl_shaped_rewards(torch.tensor([1.0, 5.0]), logp, ref, mask, 0.5, "k3")
    k3 = math.log(2.0) - 0.5  # r = 1/2: r - 1 - ln r = 0.193147
    close(kl, [[k3, 0.0], [0.0, 0.0]])
    # row 1 has no response token: its score has nowhere to go, everything stays 0
    close(rewards, [[1.0 - 0.5 * k3, 0.0], [0.0, 0.0]])


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0 (V after the last token = 0):
    #   t=2: delta = 2 + 0 - 1.5 = 0.5;          A2 = 0.5
    #   t=1: delta = 0 + 1.5 - 1.0 = 0.5;        A1 = 0.5 + 0.5 * 0.5 = 0.75
    #   t=0: delta = 1 + 1.0 - 0.5 = 1.5;        A0 = 1.5 + 0.5 * 0.75 = 1.875
    # row 1 (t=2 is padding; its reward 99 and value 7 must not leak):
    #   t=1: delta = 2 + 0 - 1.0 = 1.0;          A1 = 1.0
    #   t=0: delta = 1 + 1.0 - 0.5 = 1.5;        A0 = 1.5 + 0.5 * 1.0 = 2.0
    close(adv, [[1.875, 0.75, 0.5], [2.0, 1.0, 0.0]])
    # returns = A + V: [2.375, 1.75, 2.0], [2.5, 2.0, (pad) 0]
    close(ret, [[2.375, 1.75, 2.0], [2.5, 2.0, 0.0]])


def test_gae_discount_and_holes() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 5.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, float("nan"), 1.5]])
    # lam = 1: A_t = discounted return - V_t.  gamma = 0.5:
    #   G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5 -> A = [1.0, 0.0, 0.5]
    adv, _ = gae(rewards[:1], values[:1], torch.ones(1, 3), gamma=0.5, lam=1.0)
    close(adv, [[1.0, 0.0, 0.5]])
    # A hole at t=1 is skipped (nan value there must not leak):
    #   t=2: A = 2 - 1.5 = 0.5; t=0: delta = 1 + 1.5 - 0.5 = 2, A = 2 + 0.5 * 0.5 = 2.25
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    adv, ret = gae(rewards[1:], values[1:], mask, gamma=1.0, lam=0.5)
    close(adv, [[2.25, 0.0, 0.5]])
    close(ret, [[2.75, 0.0, 2.0]])


def test_policy_loss_one_of_two_clipped() -> None:
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.1), math.log(1.5), 5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # third token (ratio e^5) is padding
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: ratio 1.1 inside [0.8, 1.2] -> max(-1.1, -1.1) = -1.1, not clipped
    # token 1: ratio 1.5 -> max(-1.5, -1.2) = -1.2, clipped term active
    close(loss, -1.15)  # (-1.1 - 1.2) / 2
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 1.3)  # (1.1 + 1.5) / 2
    # 0.5 * (ln(1.1)^2 + ln(1.5)^2) / 2 = 0.25 * (0.0090840 + 0.1644019) = 0.0433715
    close(stats["approxkl"], 0.0433715)
    loss.backward()
    # d/dlogp of -A * ratio / 2 = -1.1 / 2 on token 0; the clipped token gets no gradient
    close(logp.grad, [[-0.55, 0.0, 0.0]])


def test_policy_loss_negative_advantage() -> None:
    # A = -1, ratio 0.5: max(-A * 0.5, -A * 0.8) = max(0.5, 0.8) = 0.8 (clipped)
    # A = -1, ratio 1.5: max(1.5, 1.2) = 1.5 (unclipped: pessimistic bound keeps it)
    logp = torch.tensor([[math.log(0.5), math.log(1.5)]])
    loss, stats = policy_loss(logp, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2))
    close(loss, 1.15)  # (0.8 + 1.5) / 2
    close(stats["clipfrac"], 0.5)


def test_value_loss_clip() -> None:
    values = torch.tensor([[1.0, 2.5, 100.0]], requires_grad=True)
    old = torch.tensor([[1.5, 1.5, 0.0]])
    returns = torch.tensor([[0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: v - old = -0.5 -> -0.2, v_clip = 1.3: max((1-0)^2, 1.3^2) = 1.69 (clipped)
    # token 1: v - old = 1.0 -> 0.2, v_clip = 1.7: max(0.5^2, 0.3^2) = 0.25 (unclipped)
    close(loss, 0.485)  # 0.5 * (1.69 + 0.25) / 2
    close(stats["clipfrac"], 0.5)
    close(stats["error"], 0.625)  # (1.0 + 0.25) / 2
    loss.backward()
    # token 1 gradient: 0.5 * 2 * (2.5 - 2.0) / 2 = 0.25; token 0 is clipped -> 0
    close(values.grad, [[0.0, 0.25, 0.0]])


def test_lagrangian_advantages() -> None:
    # lam = 1: [(1 - 0.5) / 2, (2 + 1) / 2]; lam = 0 leaves reward advantages untouched
    r, c = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    close(lagrangian_advantages(r, c, 1.0), [0.25, 1.5])
    close(lagrangian_advantages(r, c, 0.0), [1.0, 2.0])
    close(lagrangian_advantages(r, c, 3.0), [(1 - 1.5) / 4, (2 + 3) / 4])  # [-0.125, 1.25]


# Two responses of 3 and 2 tokens (row 1's last column is padding, filled with garbage that
# must not leak into anything).
ADV_SCORES = torch.tensor([1.0, -2.0])
ADV_LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.5, -9.0]])
ADV_REF = torch.tensor([[-1.5, -2.0, -0.3], [-1.0, -1.0, 7.0]])
ADV_VALUES = torch.tensor([[0.5, 0.2, 0.8], [0.1, -1.0, 5.0]])
ADV_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# By hand, beta = 0.1, gamma = 1, lam = 0.5:
#   kl = logp - ref: [0.5, 0, -0.2], [-0.5, 0.5, (pad)]
#   rewards = -0.1 kl, score at the last token: [-0.05, 0, 1.02], [0.05, -2.05, 0]
#   row 0: d2 = 1.02 - 0.8 = 0.22, A2 = 0.22; d1 = 0.8 - 0.2 = 0.6, A1 = 0.6 + 0.11 = 0.71;
#          d0 = -0.05 + 0.2 - 0.5 = -0.35, A0 = -0.35 + 0.355 = 0.005
#   row 1: d1 = -2.05 + 1.0 = -1.05, A1 = -1.05; d0 = 0.05 - 1.0 - 0.1 = -1.05,
#          A0 = -1.05 - 0.525 = -1.575
ADV_A = [[0.005, 0.71, 0.22], [-1.575, -1.05, 0.0]]
ADV_RETURNS = [[0.505, 0.91, 1.02], [-1.475, -2.05, 0.0]]  # A + V, before whitening


def test_ppo_advantages_by_hand() -> None:
    out = ppo_advantages(ADV_SCORES, ADV_LOGP, ADV_REF, ADV_VALUES, ADV_MASK, beta=0.1, lam=0.5,
                         whiten_advantages=False)
    close(out.kl, [[0.5, 0.0, -0.2], [-0.5, 0.5, 0.0]])
    close(out.sequence_kl, [0.3, 0.0])  # summed over each response's tokens, not averaged
    close(out.advantages, ADV_A)
    close(out.returns, ADV_RETURNS)
    close(out.cost_returns, [[0.0] * 3] * 2)


def test_ppo_advantages_whitened_over_valid_tokens_returns_unwhitened() -> None:
    out = ppo_advantages(ADV_SCORES, ADV_LOGP, ADV_REF, ADV_VALUES, ADV_MASK, beta=0.1, lam=0.5)
    valid = torch.tensor([0.005, 0.71, 0.22, -1.575, -1.05], dtype=torch.float64)
    mean, std = valid.mean().item(), valid.std().item()  # -0.338, 0.94398 (n - 1)
    expected = [[(a - mean) / std for a in ADV_A[0]],
                [(a - mean) / std for a in ADV_A[1][:2]] + [0.0]]
    close(out.advantages, expected, atol=1e-4)
    close(out.returns, ADV_RETURNS)


def test_ppo_advantages_lagrangian_by_hand() -> None:
    costs = torch.tensor([0.5, 0.0])
    cost_values = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.0, 9.0]])
    out = ppo_advantages(ADV_SCORES, ADV_LOGP, ADV_REF, ADV_VALUES, ADV_MASK, beta=0.1, lam=0.5,
                         whiten_advantages=False, costs=costs, cost_values=cost_values,
                         multiplier=3.0)
    # cost stream = +0.1 kl, cost at the last token: [0.05, 0, 0.48], [-0.05, 0.05, 0]
    #   row 0: d2 = 0.48 - 0.1 = 0.38, C2 = 0.38; d1 = 0, C1 = 0.19; d0 = 0.05, C0 = 0.145
    #   row 1: d1 = 0.05, C1 = 0.05; d0 = -0.05 + 0 - 0.2 = -0.25, C0 = -0.225
    close(out.cost_returns, [[0.245, 0.29, 0.48], [-0.025, 0.05, 0.0]])
    # (A - 3 C) / 4
    close(out.advantages, [[(0.005 - 0.435) / 4, (0.71 - 0.57) / 4, (0.22 - 1.14) / 4],
                           [(-1.575 + 0.675) / 4, (-1.05 - 0.15) / 4, 0.0]])
    close(out.returns, ADV_RETURNS)  # the reward critic's targets do not see the cost


@pytest.mark.parametrize("multiplier", [0.5, 5.0])
def test_lagrangian_kl_weight_does_not_shrink_with_lambda(multiplier: float) -> None:
    # GAE is linear: the combined advantage is the advantage of the reward
    # (score - lambda cost) / (1 + lambda) - beta kl, with the KL at full weight beta.
    costs = torch.tensor([0.5, 0.25])
    cost_values = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.0, 9.0]])
    out = ppo_advantages(ADV_SCORES, ADV_LOGP, ADV_REF, ADV_VALUES, ADV_MASK, beta=0.1, lam=0.5,
                         whiten_advantages=False, costs=costs, cost_values=cost_values,
                         multiplier=multiplier)
    mixed_score = (ADV_SCORES - multiplier * costs) / (1 + multiplier)
    rewards, _ = kl_shaped_rewards(mixed_score, ADV_LOGP, ADV_REF, ADV_MASK, 0.1)
    values = (ADV_VALUES - multiplier * cost_values) / (1 + multiplier)
    expected, _ = gae(rewards, values, ADV_MASK, 1.0, 0.5)
    close(out.advantages, expected.tolist())


# --------------------------------------------------------------------- reward model


def test_bradley_terry_pairs() -> None:
    chosen, rejected, weight = bradley_terry_pairs([[0, 1, 2], [1, 0]])
    # group 0 (flat 0..2): 0>1, 0>2, 1>2, 3 pairs; group 1 (flat 3..4): 4>3, 1 pair
    assert chosen.tolist() == [0, 0, 1, 4]
    assert rejected.tolist() == [1, 2, 2, 3]
    assert chosen.dtype == rejected.dtype == torch.long
    # 2 groups: group 0 pairs 1/3/2 = 1/6 each, group 1 pair 1/1/2 = 1/2
    close(weight, [1 / 6, 1 / 6, 1 / 6, 0.5])
    close(weight.sum(), 1.0)


def test_best_worst_pairs() -> None:
    # group 0 (flat 0..3): best is rank 0 at 2, worst rank 3 at 1; group 1 (flat 4..5): 5 > 4;
    # group 2 (flat 6..7) is all tied: no pair; group 3 (flat 8..11): ties at both ends keep
    # the earliest of each.
    chosen, rejected = best_worst_pairs([[1, 3, 0, 2], [1, 0], [2, 2], [0, 0, 1, 1]])
    assert chosen.tolist() == [2, 5, 8]
    assert rejected.tolist() == [1, 4, 10]
    assert chosen.dtype == rejected.dtype == torch.long
    chosen, rejected = best_worst_pairs([[0, 1, 1], [1, 1]])
    assert chosen.tolist() == [0] and rejected.tolist() == [1]
    chosen, rejected = best_worst_pairs([])
    assert chosen.numel() == rejected.numel() == 0
    # Each pair is one of the pairs bradley_terry_pairs lists for the same ranking.
    ranks = [[2, 0, 1, 3], [0, 2, 1]]
    all_pairs = set(zip(*(t.tolist() for t in bradley_terry_pairs(ranks)[:2])))
    assert set(zip(*(t.tolist() for t in best_worst_pairs(ranks)))) <= all_pairs


def test_bradley_terry_pairs_ties_skipped() -> None:
    chosen, rejected, weight = bradley_terry_pairs([[0, 0, 1]])
    assert list(zip(chosen.tolist(), rejected.tolist())) == [(0, 2), (1, 2)]
    close(weight, [0.5, 0.5])
    # an all-tied group yields no pair and does not count in the group normaliser
    chosen, rejected, weight = bradley_terry_pairs([[0, 0], [0, 1]])
    assert chosen.tolist() == [2] and rejected.tolist() == [3]
    close(weight, [1.0])
    chosen, rejected, weight = bradley_terry_pairs([[3, 3]])
    assert chosen.numel() == rejected.numel() == weight.numel() == 0


def test_bradley_terry_loss() -> None:
    rewards = torch.tensor([2.0, 1.0, 0.5, 3.0], requires_grad=True)
    chosen, rejected = torch.tensor([0, 2]), torch.tensor([1, 3])
    # d = [2 - 1, 0.5 - 3] = [1.0, -2.5]; -log sigmoid(d) = log(1 + e^-d)
    #   = [log(1 + e^-1), log(1 + e^2.5)] = [0.3132617, 2.5788897]
    loss, stats = bradley_terry_loss(rewards, chosen, rejected)
    close(loss, (0.3132617 + 2.5788897) / 2)  # 1.4460757
    close(stats["accuracy"], 0.5)
    close(stats["margin"], -0.75)  # (1.0 - 2.5) / 2
    loss, _ = bradley_terry_loss(rewards, chosen, rejected, torch.tensor([0.25, 0.75]))
    close(loss, 2.0124827)  # 0.25 * 0.3132617 + 0.75 * 2.5788897
    # margin 0.5: [log(1 + e^-0.5), log(1 + e^3)] = [0.4740770, 3.0485874]
    loss, _ = bradley_terry_loss(rewards, chosen, rejected, margin=0.5)
    close(loss, (0.4740770 + 3.0485874) / 2)
    loss.backward()
    assert rewards.grad is not None


def test_bradley_terry_loss_ties_and_empty() -> None:
    rewards = torch.tensor([1.0, 1.0])
    loss, stats = bradley_terry_loss(rewards, torch.tensor([0]), torch.tensor([1]))
    close(loss, math.log(2.0))  # -log sigmoid(0)
    close(stats["accuracy"], 0.0)  # a tie is not a correct ranking
    empty = torch.zeros(0, dtype=torch.long)
    r = torch.tensor([1.0], requires_grad=True)
    loss, stats = bradley_terry_loss(r, empty, empty)
    close(loss, 0.0)
    loss.backward()  # stays connected to the graph


def test_pairs_weights_give_mean_over_groups() -> None:
    # Group 0's pair losses average a; group 1's average b -> weighted sum (a + b) / 2
    chosen, rejected, weight = bradley_terry_pairs([[0, 1, 2], [1, 0]])
    per_pair = torch.tensor([1.0, 2.0, 3.0, 10.0])  # group 0 mean 2, group 1 mean 10
    close((weight * per_pair).sum(), 6.0)  # (2 + 10) / 2


def test_expected_calibration_error() -> None:
    probs = torch.tensor([0.1, 0.15, 0.8, 0.9, 0.95])
    correct = torch.tensor([False, True, True, True, False])
    ece, bins = expected_calibration_error(probs, correct, n_bins=2)
    # bin [0, .5): conf (0.1 + 0.15)/2 = 0.125, acc 1/2 -> 2/5 * 0.375 = 0.15
    # bin [.5, 1]: conf (0.8 + 0.9 + 0.95)/3 = 0.883333, acc 2/3 -> 3/5 * 0.216667 = 0.13
    assert ece == pytest.approx(0.28, abs=1e-6)
    assert [b["count"] for b in bins] == [2, 3]
    assert bins[0]["lo"] == 0.0 and bins[0]["hi"] == 0.5 and bins[1]["hi"] == 1.0
    assert bins[0]["confidence"] == pytest.approx(0.125, abs=1e-6)
    assert bins[1]["accuracy"] == pytest.approx(2 / 3, abs=1e-6)


def test_expected_calibration_error_edges() -> None:
    # p = 1.0 falls in the last bin, p = 0.5 opens the upper bin; empty bins report 0
    ece, bins = expected_calibration_error(
        torch.tensor([0.5, 1.0]), torch.tensor([True, True]), n_bins=4
    )
    assert [b["count"] for b in bins] == [0, 0, 1, 1]
    # bin [.5, .75): |1 - 0.5| * 1/2 = 0.25; bin [.75, 1]: |1 - 1| = 0
    assert ece == pytest.approx(0.25)
    assert bins[0]["confidence"] == 0.0 and bins[0]["accuracy"] == 0.0
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0, dtype=torch.bool))[0] == 0.0


# ------------------------------------------------------------------ KL / Lagrangian


def test_fixed_kl_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped 0.2; mult = 1 + 0.2 * 1000/10000 = 1.02
    ctl.update(9.0, 1000)
    assert ctl.value == pytest.approx(0.102)  # 0.1 * 1.02
    # KL 5.4: e = 0.9 - 1 = -0.1 (inside the clip); mult = 1 - 0.1 * 0.1 = 0.99
    ctl.update(5.4, 1000)
    assert ctl.value == pytest.approx(0.10098)  # 0.102 * 0.99
    # KL 0: e = -1 -> clipped -0.2; mult = 1 - 0.2 * 0.1 = 0.98
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(0.0989604)  # 0.10098 * 0.98
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    restored.update(9.0, 1000)
    ctl.update(9.0, 1000)
    assert restored.value == ctl.value


def test_lagrange_multiplier() -> None:
    lag = LagrangeMultiplier(init=1.0, lr=0.1, max_value=5.0, threshold=0.0)
    assert lag.update(2.0) == pytest.approx(1.2)  # 1 + 0.1 * (2 - 0)
    assert lag.update(-20.0) == 0.0  # 1.2 + 0.1 * -20 = -0.8 -> clamp at 0
    assert lag.update(100.0) == 5.0  # 0 + 0.1 * 100 = 10 -> clamp at max 5
    assert lag.value == 5.0
    lag2 = LagrangeMultiplier(init=0.5, lr=0.1, threshold=1.0)
    assert lag2.update(0.5) == pytest.approx(0.45)  # 0.5 + 0.1 * (0.5 - 1)
    restored = LagrangeMultiplier()
    restored.load_state_dict(lag2.state_dict())
    assert restored.value == lag2.value and restored.threshold == 1.0

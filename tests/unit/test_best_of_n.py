"""Best-of-N: the reward model picks among N samples of the same policy, per prompt."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from stages import evaluate
from stages.evaluate import Samples, best_of_n, best_of_n_curve, best_of_n_kl


def test_best_of_n_kl_matches_the_closed_form() -> None:
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(4) == pytest.approx(1.3862944 - 0.75)


def test_best_of_n_picks_the_highest_reward_per_prompt(monkeypatch) -> None:
    seeds = []

    def fake_sample(model, tok, prompts, cfg, seed):
        seeds.append(seed)
        # Candidate j of prompt i is the single token 10 * j + (i + j) % 3.
        j = (seed - 5) // 7919
        toks = [[10 * j + (i + j) % 3] for i in range(len(prompts))]
        return Samples(toks, [f"c{j}p{i}" for i in range(len(prompts))], [j % 2 == 0] * 3)

    monkeypatch.setattr(evaluate, "sample", fake_sample)
    first = Samples([[0], [1], [2]], ["c0p0", "c0p1", "c0p2"], [True] * 3)
    # The reward model's score of a candidate: prompt 0 prefers candidate 2, prompt 1 candidate
    # 0, prompt 2 has a tie between candidates 1 and 3 (the earlier one wins).
    table = {(0, 0): 0.1, (0, 1): 0.2, (0, 2): 0.9, (0, 3): 0.0,
             (1, 0): 0.8, (1, 1): 0.1, (1, 2): 0.3, (1, 3): 0.7,
             (2, 0): 0.0, (2, 1): 0.5, (2, 2): 0.4, (2, 3): 0.5}
    scorers = SimpleNamespace(rm=lambda prompts, tokens: [
        table[(i, t[0] // 10)] for i, t in enumerate(tokens)])
    cfg = SimpleNamespace(eval=SimpleNamespace(best_of_n=4))
    chosen, candidates, scores = best_of_n(None, None, [[1], [2], [3]], cfg, 5, first, scorers)
    assert seeds == [5 + 7919, 5 + 2 * 7919, 5 + 3 * 7919]  # candidate 0 is reused, not resampled
    assert candidates[0] is first and len(candidates) == 4
    assert scores.shape == (4, 3) and scores[2, 0] == 0.9 and scores[3, 1] == 0.7
    assert chosen.texts == ["c2p0", "c0p1", "c1p2"]
    assert chosen.tokens == [[20 + 2 % 3], [1], [10 + 3 % 3]]
    assert chosen.has_eos == [True, True, False]


def test_best_of_n_curve_is_the_expected_pick_of_n_from_the_same_samples() -> None:
    # One prompt, 3 candidates: RM scores 0.2, 0.9, 0.5 with values 1, 3, 2 (sorted by score:
    # 1, 2, 3). n=1 picks uniformly (mean 2); n=2 picks the better of a random pair: pairs
    # {1,2} -> 2, {1,3} -> 3, {2,3} -> 3, mean 8/3; n=3 picks the best, 3.
    curve = best_of_n_curve([[0.2, 0.9, 0.5]], [[1.0, 3.0, 2.0]])
    assert curve == pytest.approx([2.0, 8.0 / 3.0, 3.0])
    # Tied scores rank the earlier candidate higher, as the pick does: best-of-2 of these is
    # candidate 0 (value 5); the other value is 1.
    assert best_of_n_curve([[0.5, 0.5]], [[5.0, 1.0]]) == pytest.approx([3.0, 5.0])
    # Means over prompts; the RM score's own curve rises with n.
    two = best_of_n_curve([[0.2, 0.9, 0.5], [1.0, 0.0, 0.0]], [[1.0, 3.0, 2.0], [4.0, 0.0, 1.0]])
    assert two[0] == pytest.approx((2.0 + 5.0 / 3.0) / 2) and two[2] == pytest.approx(3.5)
    rm = [[0.2, 0.9, 0.5]]
    assert best_of_n_curve(rm, rm) == sorted(best_of_n_curve(rm, rm))
    with pytest.raises(ValueError, match="expected two"):
        best_of_n_curve([[0.1, 0.2]], [[1.0]])

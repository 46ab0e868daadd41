from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stages.judge import (
    AnnotatorPool,
    AnnotatorSpec,
    Judge,
    default_pool,
    gold_ranks,
    load_judge,
    pairwise_agreement,
)

APPLE_REF = "Fruit with red or yellow or green skin and sweet to tart crisp whitish flesh."
APPLE_GOOD = "A round fruit with red or green skin and crisp flesh."
UNRELATED = "The committee postponed the vote until after the holidays."
PROMPT = 'Define the word "apple" in one sentence.'


@pytest.fixture(scope="module")
def judge() -> Judge:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return load_judge("minilm")


# --- gold judge ------------------------------------------------------------------------------


def test_judge_prefers_good_definition(judge: Judge) -> None:
    good, bad = judge.score([PROMPT] * 2, [APPLE_GOOD, UNRELATED], [APPLE_REF] * 2)
    assert judge.name == "minilm"
    assert -1.0 <= bad < good <= 1.0
    assert good - bad > 0.3


def test_judge_identity_and_symmetry(judge: Judge) -> None:
    same, fwd, bwd = judge.score(
        [PROMPT] * 3, [APPLE_REF, APPLE_GOOD, APPLE_REF], [APPLE_REF, APPLE_REF, APPLE_GOOD]
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert fwd == pytest.approx(bwd, abs=1e-5)


def test_judge_batching_and_empty_response(judge: Judge) -> None:
    responses = [APPLE_GOOD, "", UNRELATED, "fruit " * 400, APPLE_REF] * 3
    refs = [APPLE_REF] * len(responses)
    one = load_judge("minilm", batch_size=1).score([PROMPT] * len(refs), responses, refs)
    many = judge.score([PROMPT] * len(refs), responses, refs)
    assert np.allclose(one, many, atol=1e-5)
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 + 1e-6 for s in many)
    assert judge.score([], [], []) == []


def test_judge_matches_sentence_transformers(judge: Judge) -> None:
    st = pytest.importorskip("sentence_transformers")
    from stages.judge import minilm_model_dir

    model = st.SentenceTransformer(str(minilm_model_dir()), device="cpu")
    emb = model.encode([APPLE_GOOD, APPLE_REF], normalize_embeddings=True)
    expected = float(emb[0] @ emb[1])
    assert judge.score([PROMPT], [APPLE_GOOD], [APPLE_REF])[0] == pytest.approx(expected, abs=1e-5)


def test_judge_length_mismatch(judge: Judge) -> None:
    with pytest.raises(ValueError, match="same length"):
        judge.score([PROMPT], [APPLE_GOOD, UNRELATED], [APPLE_REF])


def test_function_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_judges.py").write_text(
        textwrap.dedent(
            """
            def overlap(prompts, responses, references, scale=1.0):
                return [
                    scale * len(set(r.split()) & set(f.split())) for r, f in zip(responses, references)
                ]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_judges", raising=False)
    j = load_judge("my_judges:overlap")
    assert j.name == "my_judges:overlap"
    assert j.score(["p", "p"], ["a b c", "x"], ["a b d", "y"]) == [2.0, 0.0]
    scaled = load_judge("my_judges:overlap", scale=0.5)
    assert scaled.score(["p"], ["a b c"], ["a b d"]) == [1.0]
    with pytest.raises(ValueError, match='judge "my_judges:nope"'):
        load_judge("my_judges:nope")


@pytest.mark.parametrize("spec", ["xyz", "MiniLM-L6"])
def test_unknown_judge_spec(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        load_judge(spec)
    assert str(info.value) == f'judge "{spec}": expected "minilm" or "module:function"'


def test_unimportable_judge_module() -> None:
    with pytest.raises(ValueError, match='judge "no_such_module_xyz:f": cannot import'):
        load_judge("no_such_module_xyz:f")


# --- ranks and agreement ---------------------------------------------------------------------


def test_gold_ranks_dense_with_ties() -> None:
    assert gold_ranks([0.1, 0.5, 0.3, 0.5]) == [2, 0, 1, 0]
    assert gold_ranks([]) == []


def test_pairwise_agreement() -> None:
    assert pairwise_agreement([0, 1, 2], [0, 1, 2]) == (3, 3)
    assert pairwise_agreement([0, 1, 2], [2, 1, 0]) == (0, 3)
    assert pairwise_agreement([0, 1, 2], [1, 0, 2]) == (2, 3)
    # the tie in the first ranking removes pair (0, 1) from the comparison
    assert pairwise_agreement([0, 0, 1], [1, 0, 2]) == (2, 2)


# --- simulated annotators --------------------------------------------------------------------


def _random_scores(n: int, k: int = 4, seed: int = 123) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return [list(rng.uniform(0.2, 0.8, size=k)) for _ in range(n)]


def _agreement(pool: AnnotatorPool, examples: list[list[float]]) -> float:
    agree = compared = 0
    for i, scores in enumerate(examples):
        ranks, _ = pool.rank(scores, rng_key=i)
        a, c = pairwise_agreement(ranks, gold_ranks(scores))
        agree += a
        compared += c
    return agree / compared


def test_noiseless_annotator_matches_gold() -> None:
    pool = AnnotatorPool([AnnotatorSpec(0.0, 0.0)], seed=7)
    examples = _random_scores(300)
    assert _agreement(pool, examples) == 1.0
    ranks, who = pool.rank([0.3, 0.9, 0.3, 0.1], rng_key=0)
    assert (ranks, who) == ([1, 0, 1, 2], 0)


def test_noisy_ranks_are_permutations() -> None:
    pool = default_pool(seed=3)
    for i, scores in enumerate(_random_scores(50, k=5)):
        ranks, who = pool.rank(scores, rng_key=i)
        assert sorted(ranks) == list(range(5))
        assert 0 <= who < 4


def test_agreement_falls_with_temperature() -> None:
    examples = _random_scores(500)
    values = [
        _agreement(AnnotatorPool([AnnotatorSpec(t, 0.0)], seed=1), examples)
        for t in [0.0, 0.02, 0.05, 0.1, 0.3, 1.0]
    ]
    assert values[0] == 1.0
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.7


def test_agreement_falls_with_flip_prob() -> None:
    examples = _random_scores(500)
    values = [
        _agreement(AnnotatorPool([AnnotatorSpec(0.0, p)], seed=1), examples)
        for p in [0.0, 0.2, 0.5, 1.0]
    ]
    assert values[0] == 1.0
    assert all(a > b for a, b in zip(values, values[1:])), values
    # a single adjacent swap in a ranking of 4 breaks exactly 1 of its 6 pairs
    assert values[-1] == pytest.approx(5 / 6)


def test_rank_determinism_independent_of_call_order() -> None:
    examples = _random_scores(40, k=6)
    a = default_pool(seed=11)
    b = default_pool(seed=11)
    forward = [a.rank(s, rng_key=i) for i, s in enumerate(examples)]
    backward = [b.rank(s, rng_key=i) for i, s in reversed(list(enumerate(examples)))][::-1]
    assert forward == backward
    other_seed = default_pool(seed=12)
    assert forward != [other_seed.rank(s, rng_key=i) for i, s in enumerate(examples)]


def test_rank_without_key_is_reproducible_per_seed() -> None:
    examples = _random_scores(20)
    first, second = default_pool(seed=5), default_pool(seed=5)
    assert [first.rank(s) for s in examples] == [second.rank(s) for s in examples]


def test_annotator_choice_uses_whole_pool() -> None:
    pool = default_pool(n=4, seed=0)
    chosen = {pool.rank([0.1, 0.2], rng_key=i)[1] for i in range(200)}
    assert chosen == {0, 1, 2, 3}


def test_default_pool_temperatures() -> None:
    temps = [s.temperature for s in default_pool(n=3, temperature=0.1).specs]
    assert temps == pytest.approx([0.05, 0.1, 0.15])
    assert [s.temperature for s in default_pool(n=1, temperature=0.1).specs] == [0.1]


def test_rank_edge_cases() -> None:
    pool = default_pool(flip_prob=1.0)
    assert pool.rank([], rng_key=0)[0] == []
    assert pool.rank([0.4], rng_key=0)[0] == [0]
    with pytest.raises(ValueError):
        AnnotatorSpec(-0.1, 0.0)
    with pytest.raises(ValueError):
        AnnotatorSpec(0.1, 1.5)
    with pytest.raises(ValueError):
        AnnotatorPool([], seed=0)


def test_judge_masks_the_headword(judge: Judge) -> None:
    circular = "An apple is a round fruit with crisp flesh, like apples."
    blanked = "An is a round fruit with crisp flesh, like ."
    masked, plain = judge.score([PROMPT] * 2, [circular, blanked], [APPLE_REF] * 2)
    assert masked == pytest.approx(plain, abs=1e-6)
    raw = load_judge("minilm", mask_headword=False).score([PROMPT], [circular], [APPLE_REF])[0]
    assert abs(raw - masked) > 1e-3  # the unmasked judge embeds the headword

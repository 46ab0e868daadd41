"""A group's shared prompt run once (trunk_hidden with groups) against one plain pass."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.models import position_ids, shared_prefix, trunk_hidden
from pipeline.text import generate, pad_prompts
from stages.scoring import PolicyModel, ScoreModel, sequence_scores

torch.set_num_threads(1)
PAD, EOS = 0, 1


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, eos_token_id=EOS, num_labels=1)


def causal() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config()).eval()


def classifier() -> ScoreModel:
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config())
    torch.nn.init.normal_(model.score.weight)
    return ScoreModel(model).eval()


def right_padded():
    """Two prompts (lengths 4 and 3) x 3 responses, right-padded: (ids, mask, groups)."""
    rows = [[2, 3, 4, 5, 9, 10, EOS], [2, 3, 4, 5, 11, EOS], [2, 3, 4, 5, 12, 13, 14, EOS],
            [2, 3, 6, 20, EOS], [2, 3, 6, 21, 22, EOS], [2, 3, 6, 23, 24, 25, 26, EOS]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, torch.tensor([0, 0, 0, 1, 1, 1])


def left_padded():
    """PPO's layout: left-padded prompts, right-padded responses; rows 0-1 and 2-3 share a
    prompt, row 4 is alone."""
    ids = torch.tensor([[PAD, 2, 3, 4, 9, EOS, PAD], [PAD, 2, 3, 4, 10, 11, EOS],
                        [2, 3, 6, 7, 12, EOS, PAD], [2, 3, 6, 7, 13, 14, 15],
                        [PAD, PAD, 2, 8, 16, EOS, PAD]])
    mask = (ids != PAD).long()
    mask[3, -1] = 1
    return ids, mask, torch.tensor([0, 0, 1, 1, 2])


def plain_hidden(trunk, ids, mask):
    return trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)
                 ).last_hidden_state


def test_plan_finds_groups_and_the_first_column_that_differs():
    ids, mask, groups = right_padded()
    first, inverse, split = shared_prefix(groups, ids, mask)
    assert first.tolist() == [0, 3]
    assert inverse.tolist() == [0, 0, 0, 1, 1, 1]
    assert split == 3  # the second prompt has 3 tokens, the first 4
    # Group labels need not be 0..G-1 or sorted.
    first, inverse, split = shared_prefix(torch.tensor([7, 7, 7, 2, 2, 2]), ids, mask)
    assert sorted(first.tolist()) == [0, 3] and split == 3


def test_plan_is_none_when_nothing_is_shared():
    ids, mask, _ = right_padded()
    assert shared_prefix(torch.arange(6), ids, mask) is None        # every row alone
    ids[1, 0] = 7
    assert shared_prefix(torch.zeros(6, dtype=torch.long), ids, mask) is None  # column 0 differs


@pytest.mark.parametrize("layout", [right_padded, left_padded])
def test_hidden_states_and_gradients_equal_one_plain_pass(layout):
    model = causal().train()
    trunk = model.model
    ids, mask, groups = layout()
    assert shared_prefix(groups, ids, mask) is not None

    def run(forward):
        model.zero_grad()
        hidden = forward()
        (hidden[mask.bool()] ** 2).mean().backward()
        return hidden.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = run(lambda: plain_hidden(trunk, ids, mask))
    shared, shared_grads = run(lambda: trunk_hidden(trunk, ids, mask, groups))
    real = mask.bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=1e-5, atol=1e-5)
    assert len(shared_grads) == len(plain_grads) > 0
    for a, b in zip(shared_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_without_groups_the_whole_batch_shares_its_common_start():
    """pad_prompts keeps the chat template in the first columns: it runs once for all rows."""
    prompts = [[2, 3, 4, 5], [2, 3, 4, 6, 7], [2, 3, 4, 8]]
    query, query_mask = pad_prompts(prompts, PAD)
    ids = torch.cat([query, torch.tensor([[9, EOS], [10, EOS], [11, 12]])], dim=1)
    mask = torch.cat([query_mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
    _, _, split = shared_prefix(torch.zeros(3, dtype=torch.long), ids, mask)
    assert split == 3
    trunk = causal().model
    real = mask.bool()
    torch.testing.assert_close(trunk_hidden(trunk, ids, mask)[real],
                               plain_hidden(trunk, ids, mask)[real], rtol=1e-5, atol=1e-5)


def test_reward_and_policy_scores_equal_one_plain_pass():
    ids, mask, groups = right_padded()
    scorer = classifier()
    plain = scorer.model.score(plain_hidden(scorer.model.model, ids, mask))[..., 0]
    plain = plain.gather(1, (mask.sum(1) - 1)[:, None]).squeeze(1)
    torch.testing.assert_close(sequence_scores(scorer, ids, mask, groups=groups), plain,
                               rtol=1e-5, atol=1e-5)
    ids, mask, groups = left_padded()
    policy = PolicyModel(causal())
    scored = mask.clone()
    scored[:, :4] = 0
    alone = torch.arange(len(ids))  # every row its own group: the plain pass
    plain, _ = policy(ids, mask, scored, groups=alone)
    shared, _ = policy(ids, mask, scored, groups=groups)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_repeated_prompts_share_one_prefill_and_sample_as_alone():
    """Greedy decoding of [p, p, q, p] equals decoding each prompt by itself."""
    model = causal()

    class Tok:
        pad_token_id, eos_token_id = PAD, EOS

    p, q = [5, 6, 7], [8, 9, 10, 11]
    ours = generate(model, Tok(), [p, p, q, p], max_new_tokens=6, temperature=0.0,
                    batch_size=4)
    alone = [generate(model, Tok(), [x], max_new_tokens=6, temperature=0.0)[0]
             for x in (p, q)]
    assert ours == [alone[0], alone[0], alone[1], alone[0]]

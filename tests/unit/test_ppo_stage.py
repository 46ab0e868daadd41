"""The PPO stage's pieces around the math: rollout tensors, the composite reward, and the
alignment of every per-token read (log-probs, values, reward) on padded batches with the
same model run on one unpadded sequence, and with what the sampler drew from."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import pipeline.text as text
from pipeline.config import PPOConfig, RewardComponent
from pipeline.normalization import RewardNormalization
from stages.composite import CompositeReward, RewardSpec
from stages.ppo import critic_values, rollout_tensors
from stages.scoring import (
    PolicyModel,
    ScoreModel,
    joined_inputs,
    response_logprobs,
    sequence_scores,
)
from tests.conftest import DATA

torch.set_num_threads(1)
VOCAB, PAD, EOS = 53, 0, 1
STOPS = [1, 2]  # two stop tokens, as chat templates often have
T = 0.7
RULES = "tests.integration.ppo_rules"

# Prompts of different lengths (left padding); responses ending in either stop token, in none
# (cut at the length limit, so the longest), or at once, so every padding case is in one batch.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]
RESPONSES = [[20, 21, 1], [22, 23, 24, 25, 26], [27, 2], [1]]


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, pad_token_id=PAD, eos_token_id=STOPS,
                       num_labels=1)


def policy_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(config()).eval()


def score_model() -> LlamaForSequenceClassification:
    torch.manual_seed(1)
    return LlamaForSequenceClassification(config()).eval()


def single_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response[t] | prompt, response[:t]) from the model's own forward, one sequence."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / T
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def single_head(model, ids: list[int]) -> torch.Tensor:
    """The scalar head at every position of one unpadded sequence."""
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
    return model.score(hidden)[0, :, 0]


# --------------------------------------------------------------------------- rollout tensors


def test_rollout_tensors_pad_and_mask_after_eos():
    query, query_mask, response, mask, has_eos, lengths = rollout_tensors(
        PROMPTS, RESPONSES, PAD, STOPS)
    assert query.tolist()[2] == [PAD] * 5 + [14] and query_mask.tolist()[2] == [0] * 5 + [1]
    assert response.tolist() == [[20, 21, 1, PAD, PAD], [22, 23, 24, 25, 26],
                                 [27, 2, PAD, PAD, PAD], [1, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                             [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True, True]
    assert lengths.tolist() == [3, 5, 2, 1]


# ----------------------------------------------------------------------------- reward


def reward_function(lagrangian: bool) -> tuple[CompositeReward, list]:
    cfg = PPOConfig(reward_clip=1.5, missing_eos_penalty=1.0, lagrangian=lagrangian, rewards=[
        RewardComponent(type="model", weight=2.0),
        RewardComponent(type="rule", name=f"{RULES}:brevity", weight=0.5),
        RewardComponent(type="cost", name=f"{RULES}:verbosity", weight=3.0)])
    seen = []

    def reward_model(ids, attention):
        seen.append((ids, attention))
        return torch.tensor([0.5, 2.0, -1.0])

    spec = RewardSpec.from_config(cfg, RewardNormalization(-0.5, 2.0, 8))
    return CompositeReward(spec, reward_model), seen


@pytest.mark.parametrize("lagrangian", [False, True])
def test_reward_function_combines_normalizes_clips_and_penalizes(lagrangian):
    fn, seen = reward_function(lagrangian)
    ids, attention = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    responses = ["a b", "a b c d", ""]
    has_eos = torch.tensor([True, False, True])
    score, cost, parts = fn(ids, attention, ["p"] * 3, responses, [{}] * 3, has_eos)
    assert seen[0][0] is ids and seen[0][1] is attention
    # RM: (raw + bias) * scale = [0, 3, -3], clipped to +-1.5, weight 2 -> [0, 3, -3]
    torch.testing.assert_close(parts["model"], torch.tensor([0.0, 1.5, -1.5]))
    torch.testing.assert_close(parts["rm_raw"], torch.tensor([0.5, 2.0, -1.0]))
    # brevity -words/10 at weight 0.5: [-0.1, -0.2, 0]; verbosity words/10 at weight 3 is a
    # cost: [0.6, 1.2, 0]; row 1 has no EOS: -1.
    torch.testing.assert_close(parts["rule/brevity"], torch.tensor([-0.2, -0.4, 0.0]))
    torch.testing.assert_close(parts["cost/verbosity"], torch.tensor([0.2, 0.4, 0.0]))
    if lagrangian:  # the cost goes to the constraint, not into the score
        torch.testing.assert_close(score, torch.tensor([-0.1, 3.0 - 0.2 - 1.0, -3.0]))
        torch.testing.assert_close(cost, torch.tensor([0.6, 1.2, 0.0]))
    else:
        torch.testing.assert_close(score, torch.tensor([-0.7, 3.0 - 0.2 - 1.2 - 1.0, -3.0]))
        torch.testing.assert_close(cost, torch.zeros(3))


def test_default_cost_threshold_is_met_by_clean_definitions():
    """Safe RLHF's threshold bounds the expected episode cost; 0 is out of reach for a
    profanity probability, so the multiplier would only ever climb."""
    from stages.rewards import profanity_cost

    rows = [json.loads(line) for line in (DATA / "eval.jsonl").read_text().splitlines()]
    definitions = [r["reference"] for r in rows[:200]]
    costs = profanity_cost([""] * len(definitions), definitions, [{}] * len(definitions))
    assert min(costs) > 0.0
    assert sum(costs) / len(costs) < PPOConfig().cost_threshold


# ----------------------------------------------------------------------------- alignment


def batch():
    query, query_mask, response, mask, _, _ = rollout_tensors(PROMPTS, RESPONSES, PAD, STOPS)
    return query, query_mask, response, mask


def test_padded_logprobs_equal_single_sequence_forwards():
    model = policy_model()
    query, query_mask, response, mask = batch()
    logp, _ = response_logprobs(PolicyModel(model), query, query_mask, response, mask, T)
    for i, (prompt, resp) in enumerate(zip(PROMPTS, RESPONSES)):
        n = len(resp)
        torch.testing.assert_close(logp[i, :n], single_logprobs(model, prompt, resp).detach(),
                                   atol=1e-5, rtol=1e-5)
        assert torch.all(logp[i, n:] == 0)


def test_padded_critic_values_are_the_states_before_each_response_token():
    model = score_model()
    query, query_mask, response, mask = batch()
    values = critic_values(ScoreModel(model, extra_outputs=1), query, query_mask, response, mask)
    assert values.shape == (*response.shape, 2)
    for i, (prompt, resp) in enumerate(zip(PROMPTS, RESPONSES)):
        # V(s_t) reads the hidden state of the token before response token t.
        head = single_head(model, prompt + resp)[len(prompt) - 1: len(prompt) - 1 + len(resp)]
        torch.testing.assert_close(values[i, :len(resp), 0], head.detach(), atol=1e-5,
                                   rtol=1e-5)


def test_reward_is_read_at_the_last_response_token():
    model = score_model()
    query, query_mask, response, mask = batch()
    ids, attention = joined_inputs(query, query_mask, response, mask)
    scores = sequence_scores(ScoreModel(model), ids, attention)
    for i, (prompt, resp) in enumerate(zip(PROMPTS, RESPONSES)):
        # transformers' own pooling on an unpadded sequence reads its last token
        expected = model(input_ids=torch.tensor([prompt + resp])).logits[0, 0]
        torch.testing.assert_close(scores[i], expected.detach(), atol=1e-5, rtol=1e-5)


class _Tok:
    pad_token_id, eos_token_id = PAD, EOS


def sampled_logprobs(monkeypatch, model, prompts, autocast: bool):
    """Responses from ``generate`` and the log-prob of each sampled token under the
    distribution the sampler drew it from."""
    calls = []
    real = text.sample_next

    def spy(logits, temperature, top_k=0, top_p=1.0):
        token = real(logits, temperature, top_k, top_p)
        calls.append((logits.float().clone(), token.clone()))
        return token

    monkeypatch.setattr(text, "sample_next", spy)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        responses = text.generate(model, _Tok(), prompts, max_new_tokens=8, temperature=T,
                                  batch_size=len(prompts))
    b = len(prompts)
    sampler = torch.zeros(b, max(len(r) for r in responses))
    for step, (logits, token) in enumerate(calls):
        # Rows that finished may leave the batch: the active ones are those still running.
        rows = range(b) if len(token) == b else [r for r in range(b) if len(responses[r]) > step]
        logp = torch.log_softmax(logits / T, -1).gather(-1, token[:, None]).squeeze(-1)
        for j, r in enumerate(rows):
            if step < len(responses[r]):
                assert responses[r][step] == token[j]
                sampler[r, step] = logp[j]
    return responses, sampler


@pytest.mark.parametrize(("autocast", "atol"), [(False, 1e-5), (True, 1e-4)])
def test_sampler_logprobs_equal_scorer_logprobs(monkeypatch, autocast, atol):
    """The PPO ratio and the KL assume the tokens were drawn from the distribution that is
    scored: same temperature, same (full) vocabulary, same precision."""
    model = policy_model()
    responses, sampler = sampled_logprobs(monkeypatch, model, PROMPTS, autocast)
    assert len({len(r) for r in responses}) > 1  # some rows stopped early
    query, query_mask, response, mask, _, _ = rollout_tensors(PROMPTS, responses, PAD, STOPS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        scored, _ = response_logprobs(PolicyModel(model), query, query_mask, response, mask, T)
    valid = mask.bool()
    torch.testing.assert_close(scored[valid], sampler[valid], atol=atol, rtol=0)

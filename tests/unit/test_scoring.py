"""PolicyModel's log-probs against a causal LM's own logits, and decoding with the split head."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.models import output_logits
from pipeline.text import generate
from stages.ops import entropy_from_logits
from stages.scoring import PolicyModel

torch.set_num_threads(1)
VOCAB = 53
PAD, EOS = 0, 1


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         pad_token_id=PAD, eos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


def gemma2() -> Gemma2ForCausalLM:
    """Soft-capped logits: PolicyModel must take the generic head path and still agree."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=4, max_position_embeddings=64, final_logit_softcapping=2.0,
                          pad_token_id=PAD, eos_token_id=EOS)
    return Gemma2ForCausalLM(config).eval()


def batch():
    """Left-padded prompts, right-padded responses: (ids, attention, score mask)."""
    ids = torch.tensor([[PAD, PAD, 5, 6, 7, 8, 9, EOS, PAD],
                        [10, 11, 12, 13, 14, 15, 16, 17, 18]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    scored = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 0],
                           [0, 0, 0, 0, 1, 1, 1, 1, 1]])
    return ids, attention, scored


def reference(model, ids, attention, temperature):
    """(B, L) log p(ids[t] | ids[<t]) and (B, L) entropy from the model's own forward."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    z = logits[:, :-1].float() / temperature
    logp = torch.log_softmax(z, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = entropy_from_logits(logits[:, :-1], temperature)
    return (torch.nn.functional.pad(logp, (1, 0)), torch.nn.functional.pad(entropy, (1, 0)))


@pytest.mark.parametrize("build", [llama, gemma2])
@pytest.mark.parametrize("entropy", ["none", "detached", "grad"])
def test_policy_logprobs_match_the_models_logits(build, entropy):
    model = build()
    ids, attention, scored = batch()
    logp, ent = PolicyModel(model)(ids, attention, scored, temperature=0.7, entropy=entropy)
    ref_logp, ref_ent = reference(model, ids, attention, 0.7)
    mask = scored.bool()
    torch.testing.assert_close(logp[mask], ref_logp[mask].detach(), atol=1e-5, rtol=1e-5)
    assert torch.all(logp[~mask] == 0)
    if entropy == "none":
        assert ent is None
    else:
        torch.testing.assert_close(ent[mask], ref_ent[mask].detach(), atol=1e-4, rtol=1e-4)
        assert ent.requires_grad == (entropy == "grad")


@pytest.mark.parametrize("build", [llama, gemma2])
def test_policy_gradients_match_the_models(build):
    ids, attention, scored = batch()
    weights = torch.linspace(-1.0, 1.0, ids.numel()).view(ids.shape) * scored
    ours, theirs = build(), build()
    logp, _ = PolicyModel(ours)(ids, attention, scored, temperature=0.7)
    (logp * weights).sum().backward()
    (reference(theirs, ids, attention, 0.7)[0] * weights).sum().backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert ours.get_input_embeddings().weight.grad.abs().sum() > 0


def test_output_logits_few_rows_equal_the_head():
    model = llama()
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(output_logits(model, hidden), model.lm_head(hidden))


class _Tok:
    pad_token_id, eos_token_id = PAD, EOS


def test_greedy_generate_matches_hf_generate():
    """Trunk with KV cache, then the head on the last position: the same tokens as HF's."""
    model = llama()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    ours = generate(model, _Tok(), prompts, max_new_tokens=6, temperature=0.0)
    for prompt, response in zip(prompts, ours):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD)
        hf = out[0, len(prompt):].tolist()
        if EOS in hf:
            hf = hf[: hf.index(EOS) + 1]
        assert response == hf


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others():
    """Finished rows are dropped from the KV cache mid-generation: every row still gets
    exactly the tokens HF's own generate gives it alone."""
    model = llama()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18], [19], [20, 21, 22]]
    free = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                           pad_token_id=PAD)[0, len(p):].tolist() for p in prompts]
    stop = free[0][1]  # a token that ends row 0 at its 2nd step, and others elsewhere or never

    class Tok:
        pad_token_id, eos_token_id = PAD, stop

    model.generation_config.eos_token_id = stop
    ours = generate(model, Tok(), prompts, max_new_tokens=8, temperature=0.0, batch_size=6)
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    assert ours == expected
    assert len({len(r) for r in ours}) > 1  # rows did finish at different steps


def test_unknown_entropy_mode_is_refused():
    ids, attention, scored = batch()
    with pytest.raises(ValueError, match="entropy must be none, detached or grad, got 'full'"):
        PolicyModel(llama())(ids, attention, scored, entropy="full")


@pytest.mark.parametrize("extra", [0, 1])
def test_score_heads_stay_in_their_weights_precision_under_bf16_autocast(extra):
    """Under bf16 autocast the reward and value heads still run in float32 on the trunk's
    hidden states; a model loaded in bf16 keeps bf16 heads (no dtype mismatch)."""
    from transformers import LlamaForSequenceClassification

    from pipeline.models import hf_model
    from stages.scoring import ScoreModel, trunk_hidden

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD, num_labels=1)
    scorer = ScoreModel(LlamaForSequenceClassification(config), extra_outputs=extra).eval()
    if extra:
        torch.nn.init.normal_(scorer.extra.weight)
    ids, attention, _ = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer(ids, attention)
        inner = hf_model(scorer.model)
        hidden = trunk_hidden(getattr(inner, inner.base_model_prefix), ids, attention, None)
        # What autocast alone would make of the head: a bf16 matmul.
        assert inner.score(hidden).dtype == torch.bfloat16
    heads = [inner.score] + ([scorer.extra] if extra else [])
    expected = torch.cat([h(hidden.float()) for h in heads], dim=-1)
    assert scores.dtype == torch.float32 and torch.equal(scores, expected)
    with torch.no_grad():
        assert scorer.to(torch.bfloat16)(ids, attention).dtype == torch.float32

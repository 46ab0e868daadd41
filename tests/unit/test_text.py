"""Chat formatting and loss masks with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data import Demonstration
from pipeline.models import load_tokenizer
from pipeline.text import (
    IGNORE_INDEX,
    decode,
    encode_prompt,
    pad,
    pad_prompts,
    tokenize_conversation,
    tokenize_demonstration,
    truncate_at_eos,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct", ModelConfig())


def labelled(ids, labels):
    assert len(ids) == len(labels)
    return [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_pad_differs_from_eos(tok):
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "left"
    assert tok.chat_template


def test_loss_only_on_assistant_content_and_eos(tok):
    messages = [{"role": "user", "content": 'Define the word "cat" in one sentence.'},
                {"role": "assistant", "content": "A small domesticated feline."}]
    ids, labels = tokenize_conversation(tok, messages, 64, 256)
    target = labelled(ids, labels)
    assert tok.decode(target) == "A small domesticated feline.<|im_end|>"
    assert target[-1] == tok.eos_token_id
    # Labels equal the input ids wherever they are not masked.
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))


def test_prompt_part_matches_encode_prompt(tok):
    prompt = 'Define the word "cat" in one sentence.'
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": "A small domesticated feline."}]
    ids, labels = tokenize_conversation(tok, messages, 64, 256)
    prompt_ids = encode_prompt(tok, prompt, 64)
    assert encode_prompt(tok, [{"role": "user", "content": prompt}], 64) == prompt_ids
    # Training and sampling see the same prompt tokens; the first target follows them.
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in labels[: len(prompt_ids)])
    assert labels[len(prompt_ids)] != IGNORE_INDEX
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_multi_turn_loss_on_both_assistant_turns_only(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Define cat."},
                {"role": "assistant", "content": "A feline."},
                {"role": "user", "content": "And dog?"},
                {"role": "assistant", "content": "A canine."}]
    ids, labels = tokenize_conversation(tok, messages, 64, 256)
    target = labelled(ids, labels)
    assert tok.decode(target) == "A feline.<|im_end|>A canine.<|im_end|>"
    # The whole sequence is the rendered conversation, token for token.
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert "Define cat." not in tok.decode(target) and "And dog?" not in tok.decode(target)
    # The second prompt (everything before the 2nd answer) is the sampling-time prompt.
    second = encode_prompt(tok, messages[:4], 256)
    assert ids[: len(second)] == second


def test_prompt_completion_loss_skips_the_prompts_own_assistant_turns(tok):
    prompt = [{"role": "user", "content": "Define cat."},
              {"role": "assistant", "content": "A feline."},
              {"role": "user", "content": "And dog?"}]
    messages = [*prompt, {"role": "assistant", "content": "A canine."}]
    demo = Demonstration(tuple(messages), first_target=len(prompt))
    ids, labels = tokenize_demonstration(tok, demo, 64, 256)
    assert tok.decode(labelled(ids, labels)) == "A canine.<|im_end|>"
    # The same tokens as the whole conversation; only the mask differs.
    all_ids, all_labels = tokenize_conversation(tok, messages, 64, 256)
    assert ids == all_ids
    assert tok.decode(labelled(all_ids, all_labels)) == "A feline.<|im_end|>A canine.<|im_end|>"
    assert ids[: len(encode_prompt(tok, prompt, 256))] == encode_prompt(tok, prompt, 256)


def test_text_row_is_trained_whole_without_chat_template(tok):
    ids, labels = tokenize_demonstration(tok, Demonstration(text="The sky is blue."), 64, 256)
    assert labels == ids
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "The sky is blue.<|im_end|>"
    ids, labels = tokenize_demonstration(tok, Demonstration(text="word " * 50), 64, 10)
    assert len(ids) == len(labels) == 10


def test_truncation(tok):
    messages = [{"role": "user", "content": "word " * 100},
                {"role": "assistant", "content": "An answer."}]
    ids, labels = tokenize_conversation(tok, messages, 16, 256)
    assert tok.decode(labelled(ids, labels)) == "An answer.<|im_end|>"
    assert ids[:16] == encode_prompt(tok, messages[:1], 16)
    ids, labels = tokenize_conversation(tok, messages, 16, 18)
    assert len(ids) == len(labels) == 18


def test_truncate_at_eos():
    eos, pad_id = 2, 0
    assert truncate_at_eos([5, 6, 2, 7, 2], {eos}, pad_id) == [5, 6, 2]
    assert truncate_at_eos([5, 6, 0, 0], {eos}, pad_id) == [5, 6]
    assert truncate_at_eos([5, 9, 7], {eos, 9}, pad_id) == [5, 9]
    assert truncate_at_eos([], {eos}, pad_id) == []
    assert truncate_at_eos(torch.tensor([3, 2, 4]).tolist(), {eos}, pad_id) == [3, 2]


def test_pad_prompts():
    # Nothing shared: plain left padding.
    ids, mask = pad_prompts([[1, 2, 3], [4], [5, 6]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == torch.long
    # A shared start stays in the first columns; the padding follows it.
    ids, mask = pad_prompts([[7, 8, 1, 2, 3], [7, 8, 4], [7, 8, 5, 6]], pad_id=0)
    assert ids.tolist() == [[7, 8, 1, 2, 3], [7, 8, 0, 0, 4], [7, 8, 0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 1], [1, 1, 0, 1, 1]]
    # A prompt that is another's start still ends in a real token, where sampling begins.
    ids, mask = pad_prompts([[7, 8], [7, 8, 9], [7, 8]], pad_id=0)
    assert ids.tolist() == [[7, 0, 8], [7, 8, 9], [7, 0, 8]]
    assert mask[:, -1].tolist() == [1, 1, 1]


def test_pad_right():
    assert pad([[1], [2, 3], []], -100).tolist() == [[1, -100], [2, 3], [-100, -100]]


def test_decode_drops_special_tokens(tok):
    ids = tok("A feline.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode(tok, ids) == "A feline."


def test_sample_next_follows_the_distribution_and_filters():
    from pipeline.text import sample_next

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(20000, 4)
    counts = torch.bincount(sample_next(logits, 1.0), minlength=4).float() / 20000
    assert torch.allclose(counts, probs, atol=0.015)
    assert counts[3] == 0
    # Temperature 0 is greedy; top_k=1 and a small top_p keep only the best token.
    assert torch.equal(sample_next(logits[:5], 0.0), torch.zeros(5, dtype=torch.long))
    assert sample_next(logits[:200], 1.0, top_k=1).eq(0).all()
    assert sample_next(logits[:200], 1.0, top_p=0.4).eq(0).all()
    # top_p=0.7 keeps {0, 1} (mass 0.8 reaches 0.7), renormalized to 5/8, 3/8.
    kept = torch.bincount(sample_next(logits, 1.0, top_p=0.7), minlength=4).float() / 20000
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015)
    # Temperature sharpens: at T=0.5 the probabilities go as p^2.
    sharp = torch.bincount(sample_next(logits, 0.5), minlength=4).float() / 20000
    assert torch.allclose(sharp, torch.tensor([25, 9, 4, 0]) / 38.0, atol=0.015)

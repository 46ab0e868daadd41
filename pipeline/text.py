"""Chat formatting, tokenization with loss masks, padding and batched generation.

The same prompt encoding is used when training (SFT), sampling (label, PPO, eval) and scoring,
so a policy is always asked in exactly the format it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.data import Demonstration
from pipeline.models import hf_model, output_logits, position_ids, run_trunk
from pipeline.sharding import is_partial

IGNORE_INDEX = -100


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tok: PreTrainedTokenizerBase, messages: list[dict] | str,
                  max_prompt_tokens: int) -> list[int]:
    """Chat-formatted prompt ids ending in the assistant header; long prompts lose their start."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _ids(tok, text)[-max_prompt_tokens:]


def tokenize_conversation(tok: PreTrainedTokenizerBase, messages: list[dict],
                          max_prompt_tokens: int, max_seq_len: int, first_target: int = 0,
                          ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with loss only on assistant turns, each turn up to its EOS.

    Each assistant turn's text is the difference between the rendered conversation with and
    without it, so the prompt part is byte-identical to what ``encode_prompt`` gives at
    sampling time. Text after the EOS (the template's newline) is context, not target.
    Assistant turns before ``first_target`` are context too: they belong to the prompt.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    eos = tok.eos_token
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_target:
            continue
        header = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        turn = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        context = header[len(rendered):]
        body = turn[len(header):]
        cut = body.find(eos)
        if cut < 0:
            target, tail = body + eos, ""
        else:
            target, tail = body[: cut + len(eos)], body[cut + len(eos):]
        context_ids = _ids(tok, context)
        if not input_ids:
            context_ids = context_ids[-max_prompt_tokens:]
        target_ids = _ids(tok, target)
        input_ids += context_ids + target_ids
        labels += [IGNORE_INDEX] * len(context_ids) + target_ids
        tail_ids = _ids(tok, tail)
        input_ids += tail_ids
        labels += [IGNORE_INDEX] * len(tail_ids)
        rendered = turn
    return input_ids[:max_seq_len], labels[:max_seq_len]


def tokenize_text(tok: PreTrainedTokenizerBase, text: str, max_seq_len: int,
                  ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of plain text and an EOS, no chat template, every token a target."""
    # The tokenizer adds what its own post-processor adds (a BOS for some models).
    ids = tok(text)["input_ids"]
    if not ids or ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    ids = ids[:max_seq_len]
    return ids, list(ids)


def tokenize_demonstration(tok: PreTrainedTokenizerBase, demo: Demonstration,
                           max_prompt_tokens: int, max_seq_len: int,
                           ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT row, whichever form it came in."""
    if demo.text is not None:
        return tokenize_text(tok, demo.text, max_seq_len)
    return tokenize_conversation(tok, list(demo.messages), max_prompt_tokens, max_seq_len,
                                 demo.first_target)


def pad(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """(B, T) long tensor padded with ``value`` on ``side``."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if not s:
            continue
        if side == "right":
            out[i, : len(s)] = torch.as_tensor(s)
        else:
            out[i, width - len(s):] = torch.as_tensor(s)
    return out


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) prompt ids and mask whose rows all end at column P, where generation starts.

    The padding goes after the tokens every prompt starts with (the chat template and system
    prompt, ~20 tokens here) instead of before them, so that shared start sits in the same
    columns of every row and runs once (see ``trunk_hidden``). Positions count attended tokens
    only, so the model sees each prompt exactly as unpadded. Every row keeps a real token in
    its last column.
    """
    shortest = min((len(p) for p in prompts), default=0)
    common = 0
    while common < shortest - 1 and all(p[common] == prompts[0][common] for p in prompts):
        common += 1
    width = max((len(p) for p in prompts), default=0)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        rest = len(p) - common
        ids[i, :common] = torch.as_tensor(p[:common], dtype=torch.long)
        mask[i, :common] = 1
        if rest:
            ids[i, width - rest:] = torch.as_tensor(p[common:], dtype=torch.long)
            mask[i, width - rest:] = 1
    return ids, mask


def truncate_at_eos(tokens: Sequence[int], eos_ids: set[int], pad_id: int) -> list[int]:
    """Response tokens up to and including the first EOS; generation padding dropped."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos_ids:
            break
    while out and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


def eos_ids(tok: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> set[int]:
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                ) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits; temperature 0 is greedy.

    Sampling inverts the CDF with one uniform draw per row: on a CPU, torch.multinomial over a
    50k vocabulary costs ~25x more and dominated the whole generation loop.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = probs.cumsum(dim=-1) - probs > top_p
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    # right=True: the first index whose CDF exceeds u, so zero-probability tokens never win.
    index = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(1)
    if order is not None:
        index = order.gather(1, index[:, None]).squeeze(1)
    return index


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
             prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
             top_k: int = 0, top_p: float = 1.0, batch_size: int = 16,
             ) -> list[list[int]]:
    """Sample responses with a KV cache, stopping each at its first EOS.

    Returns each response's tokens up to and including its EOS (none if it hit
    ``max_new_tokens``). A row that has finished leaves the batch (its KV cache rows are
    dropped), so the remaining steps compute only the rows still sampling: responses are short
    on average while the longest in a batch often runs to the limit.
    """
    if any(is_partial(p) for p in model.parameters()):
        # Each decoding step would gather the shards, a collective that processes taking
        # different numbers of steps never finish together.
        raise RuntimeError("generate() needs whole weights; under FSDP or ZeRO-3 sample from "
                           "a pipeline.sharding.WholeCopy of the model")
    was_training = model.training
    model.eval()
    stops = sorted(eos_ids(tok, model))
    device = next(model.parameters()).device
    stop_ids = torch.tensor(stops, device=device)
    inner = hf_model(model)
    trunk = getattr(inner, inner.base_model_prefix)
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask = pad_prompts(chunk, tok.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        position = position_ids(mask)
        # The K samples of a prompt (label, best-of-N) share one prefill of it.
        distinct: dict[tuple[int, ...], int] = {}
        inverse = torch.tensor([distinct.setdefault(tuple(p), i) for i, p in enumerate(chunk)],
                               device=device)                               # (B,)
        first = inverse.unique()                                            # (G,)
        # The trunk, then the output head on the last position only (see output_logits).
        out, cache = run_trunk(trunk, input_ids=ids[first], attention_mask=mask[first],
                               position_ids=position[first], use_cache=True)
        hidden = out.last_hidden_state[:, -1]                               # (G, d)
        if len(first) < len(chunk):
            slot = torch.searchsorted(first, inverse)                       # (B,) row in first
            cache.batch_select_indices(slot)
            hidden = hidden[slot]                                           # (B, d)
        tokens = torch.full((len(chunk), max_new_tokens), tok.pad_token_id, dtype=torch.long,
                            device=device)                                  # (B, max_new)
        rows = torch.arange(len(chunk), device=device)  # (b,) chunk row of each active row
        for step in range(max_new_tokens):
            token = sample_next(output_logits(inner, hidden), temperature, top_k, top_p)  # (b,)
            tokens[rows, step] = token
            going = ~torch.isin(token, stop_ids)
            if step + 1 == max_new_tokens or not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            position = position[:, -1:] + 1
            out, cache = run_trunk(trunk, cache=cache, input_ids=token[:, None],
                                   attention_mask=mask, position_ids=position)
            hidden = out.last_hidden_state[:, -1]
        responses += [truncate_at_eos(row, set(stops), tok.pad_token_id)
                      for row in tokens.tolist()]
    model.train(was_training)
    return responses


def decode(tok: PreTrainedTokenizerBase, tokens: Sequence[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=True).strip()


def greedy_samples(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples,
                   max_prompt_tokens: int, max_new_tokens: int) -> list[dict]:
    """A stage's samples.jsonl rows: per prompt example, the model's greedy response."""
    encoded = [encode_prompt(tok, e.chat, max_prompt_tokens) for e in examples]
    responses = generate(model, tok, encoded, max_new_tokens=max_new_tokens, temperature=0.0)
    return [{"prompt": e.prompt, "reference": e.reference, "response": decode(tok, r)}
            for e, r in zip(examples, responses)]

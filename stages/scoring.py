"""Models read per token: log-probs of a causal LM, and scalar heads (reward model, critic).

The reads every stage shares live here: a response's log-probs after its prompt (PPO, eval),
and reward-model scores of whole sequences in batches (reward, eval).

A sequence-classification model's own forward pools at a position it infers from pad ids; we
read the head at every position ourselves and pick the last attended token, which is right for
left and right padding alike. A causal LM runs its output head only on the positions whose
log-probs are wanted. Each wrapper is one nn.Module so DDP sees a single forward.
"""

from __future__ import annotations

import torch

from pipeline.models import hf_model, output_logits, plain_output_head, trunk_hidden
from pipeline.sharding import is_partial
from pipeline.text import pad
from stages import ops


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position of each row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class PolicyModel(torch.nn.Module):
    """A causal LM read as the log-probs of given tokens: ``forward -> (B, L)``.

    Position ``t`` of the output is ``log p(input_ids[:, t] | input_ids[:, :t])`` at the given
    temperature, computed only where ``score_mask[:, t]`` is set (zeros elsewhere, and at
    ``t = 0``). The output head, a (d x V) matmul that is most of a small model's work, runs
    on those positions only: padding after EOS and the prompt cost it nothing. The last
    position predicts nothing that is scored, so the trunk does not run on it.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.workspace = ops.Workspace()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                score_mask: torch.Tensor, temperature: float = 1.0,
                entropy: str = "none", groups: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(logp, entropy)``, both ``(B, L)`` float32; entropy is None for
        ``entropy="none"``, has no graph for ``"detached"`` and one for ``"grad"``.
        ``groups`` (B,) labels rows that share a prompt (see ``trunk_hidden``)."""
        if entropy not in ("none", "detached", "grad"):
            raise ValueError(f"entropy must be none, detached or grad, got {entropy!r}")
        inner = hf_model(self.model)
        trunk = getattr(inner, inner.base_model_prefix)
        hidden = trunk_hidden(trunk, input_ids[:, :-1], attention_mask[:, :-1],
                              groups)                                         # (B, L-1, d)
        where = score_mask[:, 1:].bool()                                      # (B, L-1)
        h = hidden[where]                                                     # (N, d)
        targets = input_ids[:, 1:][where]                                     # (N,)
        head = plain_output_head(inner)
        # The fused op reads the head's weight itself: a sharded one (outside the prepared
        # model's forward, or under ZeRO-3) goes through the head's own forward instead.
        if head is not None and entropy != "grad" and not is_partial(head.weight):
            logp, ent = ops.logprobs_from_hidden(h, head.weight, head.bias, targets,
                                                 temperature, self.workspace,
                                                 with_entropy=entropy == "detached")
        else:
            logits = output_logits(inner, h)                                  # (N, V)
            logp = ops.logprobs_from_logits(logits, targets, temperature)
            ent = None
            if entropy == "detached":
                ent = ops.logprobs_and_entropy(logits.detach(), targets, temperature)[1]
            elif entropy == "grad":
                ent = ops.entropy_from_logits(logits, temperature)

        def spread(values: torch.Tensor) -> torch.Tensor:                     # (N,) -> (B, L)
            out = values.new_zeros(where.shape).masked_scatter(where, values)
            return torch.nn.functional.pad(out, (1, 0))

        return spread(logp), (spread(ent) if ent is not None else None)


class ScoreModel(torch.nn.Module):
    """Per-token scalar outputs of a sequence classifier: ``forward -> (B, T, C)``.

    ``extra_outputs`` adds zero-initialised linear outputs on the same hidden states after the
    model's own head (PPO-Lagrangian's cost value rides on the critic this way).
    """

    def __init__(self, model: torch.nn.Module, extra_outputs: int = 0):
        super().__init__()
        self.model = model
        self.extra = None
        if extra_outputs:
            width = hf_model(model).config.hidden_size
            self.extra = torch.nn.Linear(width, extra_outputs, bias=True)
            torch.nn.init.zeros_(self.extra.weight)
            torch.nn.init.zeros_(self.extra.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        inner = hf_model(self.model)
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = trunk_hidden(backbone, input_ids, attention_mask, groups)  # (B, T, d)
        # The heads in their weights' precision (float32 unless the model was loaded in bf16)
        # under any autocast: a bf16 score resolves ~3 digits, coarser than the reward
        # differences the Bradley-Terry loss and the critic's targets carry.
        with torch.autocast(hidden.device.type, enabled=False):
            heads = [inner.score] + ([self.extra] if self.extra is not None else [])
            scores = torch.cat([head(hidden.to(next(head.parameters()).dtype)).float()
                                for head in heads], dim=-1)  # (B, T, num_labels + extra)
        return scores


def sequence_scores(scorer: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, channel: int = 0,
                    groups: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) the head's output at the last real token (the reward of a whole response)."""
    extra = {} if groups is None else {"groups": groups}
    scores = scorer(input_ids, attention_mask, **extra)[..., channel]  # (B, T)
    index = last_token_index(attention_mask)
    return scores.gather(1, index[:, None]).squeeze(1)


def joined_inputs(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention)``, both (B, P+T): the prompts (ending at column P) and their
    responses as one batch."""
    ids = torch.cat([query, response], dim=1)
    attention = torch.cat([query_mask, mask.long()], dim=1)
    return ids, attention


def response_logprobs(policy: PolicyModel, query, query_mask, response, mask,
                      temperature: float, entropy: str = "none"):
    """(B, T) log-probs of the response tokens at the sampling temperature, 0 past each
    response's end; and (B, T) entropies when asked (see PolicyModel)."""
    ids, attention = joined_inputs(query, query_mask, response, mask)
    scored = torch.cat([torch.zeros_like(query_mask), mask.long()], dim=1)  # (B, P+T)
    logp, ent = policy(ids, attention, scored, temperature, entropy)
    p = query.shape[1]
    return logp[:, p:], (None if ent is None else ent[:, p:])


def padded(sequences, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and their ``attention_mask``."""
    return {"input_ids": pad(sequences, pad_id, side="right"),
            "attention_mask": pad([[1] * len(s) for s in sequences], 0, side="right")}


@torch.no_grad()
def score_sequences(scorer: torch.nn.Module, sequences, pad_id: int, batch_size: int,
                    device: torch.device, groups: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) rewards on the CPU, in ``batch_size`` chunks; ``groups`` (N,) labels sequences
    that share a prompt (see ``trunk_hidden``). Runs the unwrapped model: shards differ in
    size, so no DDP collectives here."""
    was_training = scorer.training
    scorer.eval()
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = padded(sequences[start: start + batch_size], pad_id)
        chunk = None if groups is None else groups[start: start + batch_size].to(device)
        out.append(sequence_scores(scorer, batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device), groups=chunk).cpu())
    scorer.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)

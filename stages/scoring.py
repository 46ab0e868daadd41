"""Scalar heads read per token: the reward model (at the last real token) and the critic.

A sequence-classification model's own forward pools at a position it infers from pad ids; we
read the head at every position ourselves and pick the last attended token, which is right for
left and right padding alike. The wrapper is one nn.Module so DDP sees a single forward.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last attended position of each row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inner = hf_model(self.model)
        backbone = getattr(inner, inner.base_model_prefix)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state  # (B, T, d)
        scores = inner.score(hidden).float()  # (B, T, num_labels)
        if self.extra is not None:
            scores = torch.cat([scores, self.extra(hidden).float()], dim=-1)
        return scores


def sequence_scores(scorer: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, channel: int = 0) -> torch.Tensor:
    """(B,) the head's output at the last real token (the reward of a whole response)."""
    scores = scorer(input_ids, attention_mask)[..., channel]  # (B, T)
    index = last_token_index(attention_mask)
    return scores.gather(1, index[:, None]).squeeze(1)

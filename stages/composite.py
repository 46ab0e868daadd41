"""The reward PPO optimizes, as one unit, for PPO to train on and eval to report.

A response's score is the learned reward (normalized as the reward stage measured it, then
clipped to ``ppo.reward_clip``), plus the weighted rules, minus the weighted costs, minus
``ppo.missing_eos_penalty`` when it never emitted EOS. With ``ppo.lagrangian`` the costs leave
the score and form the constraint's cost instead.

``RewardSpec`` is that objective resolved from ``ppo.rewards`` (every rule named, its
parameters bound) before any stage folder is touched; PPO records it in its manifest, and eval
scores every policy's samples with the spec of the PPO stage it evaluates, so the report shows
each term PPO optimized. ``CompositeReward`` runs the reward model on a rollout batch and
combines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from pipeline.config import PPOConfig, RewardComponent
from pipeline.errors import PipelineError
from pipeline.normalization import RewardNormalization
from stages.rewards import RuleFn, call_user, checked_values, resolve_rule


@dataclass(frozen=True)
class RewardTerm:
    """One entry of ``ppo.rewards``, resolved."""

    # "model", "rule" or "cost".
    kind: str
    # Its name in metrics and results: "model", "rule/<function>" or "cost/<function>".
    key: str
    weight: float
    # The rule or cost function (None for the model).
    fn: RuleFn | None
    # How errors name it: 'ppo.rewards[1] (rule "no_headword")'.
    what: str
    # A "module:function" of the user's, called through checks.
    user: bool
    # As configured, for the manifest.
    component: RewardComponent


class Scored(NamedTuple):
    """A batch's score (B,), constrained cost (B,) and every term's (B,) values by key, plus
    the reward model's raw output as ``rm_raw``."""

    score: torch.Tensor
    cost: torch.Tensor
    parts: dict[str, torch.Tensor]


@dataclass(frozen=True)
class RewardSpec:
    terms: tuple[RewardTerm, ...]
    # The reward model's; None when no term is the model (or no reward model is at hand).
    normalization: RewardNormalization | None
    reward_clip: float
    missing_eos_penalty: float
    # Costs go to the constraint instead of the score.
    lagrangian: bool

    @classmethod
    def resolve(cls, components: list[RewardComponent], normalization: RewardNormalization | None,
                *, reward_clip: float, missing_eos_penalty: float, lagrangian: bool,
                where: str = "ppo.rewards") -> RewardSpec:
        terms = []
        for i, comp in enumerate(components):
            what = f'{where}[{i}] ({comp.type} "{comp.name}")'
            try:
                fn = None if comp.type == "model" else resolve_rule(comp.name, **comp.params)
            except ValueError as exc:
                raise PipelineError(f"{what}: {exc}") from None
            key = "model" if comp.type == "model" else f"{comp.type}/{comp.name.split(':')[-1]}"
            terms.append(RewardTerm(comp.type, key, comp.weight, fn, what, ":" in comp.name,
                                    comp))
        return cls(tuple(terms), normalization, reward_clip, missing_eos_penalty, lagrangian)

    @classmethod
    def from_config(cls, c: PPOConfig, normalization: RewardNormalization | None) -> RewardSpec:
        return cls.resolve(c.rewards, normalization, reward_clip=c.reward_clip,
                           missing_eos_penalty=c.missing_eos_penalty, lagrangian=c.lagrangian)

    @classmethod
    def from_record(cls, record: dict, normalization: RewardNormalization | None,
                    where: str) -> RewardSpec:
        """The spec a PPO manifest recorded (``record``, its ``extras.reward``)."""
        try:
            components = [RewardComponent(type=t["type"], name=t["name"], weight=t["weight"],
                                          params=t["params"]) for t in record["terms"]]
            settings = {k: record[k] for k in ("reward_clip", "missing_eos_penalty",
                                               "lagrangian")}
        except (KeyError, TypeError) as exc:
            raise PipelineError(f"{where}: not a reward spec ({type(exc).__name__}: {exc})"
                                ) from None
        return cls.resolve(components, normalization, where=f"{where}.terms", **settings)

    def record(self) -> dict:
        """What the manifest keeps of it: enough to resolve it again."""
        return {"terms": [{"key": t.key, "type": t.component.type, "name": t.component.name,
                           "weight": t.weight, "params": dict(t.component.params)}
                          for t in self.terms],
                "reward_clip": self.reward_clip, "missing_eos_penalty": self.missing_eos_penalty,
                "lagrangian": self.lagrangian}

    @property
    def has_model(self) -> bool:
        return any(t.kind == "model" for t in self.terms)

    def without_model(self) -> RewardSpec:
        """The rule and cost terms alone (to measure them where no reward model is at hand)."""
        return replace(self, terms=tuple(t for t in self.terms if t.kind != "model"))

    @torch.no_grad()
    def combine(self, raw: torch.Tensor | None, prompts: list[str], responses: list[str],
                metas: list[dict], has_eos: torch.Tensor) -> Scored:
        """Every term on ``responses`` and their sum; ``raw`` (B,) is the reward model's
        output (None without a model term)."""
        b = len(responses)
        score = torch.zeros(b)
        cost = torch.zeros(b)
        parts: dict[str, torch.Tensor] = {}
        for term in self.terms:
            if term.kind == "model":
                value = self.normalization.apply(raw).clamp(-self.reward_clip, self.reward_clip)
                parts["rm_raw"] = raw
            else:
                # User code: an exception or a result that is not one finite number per
                # response stops the stage with one line naming the function.
                values = (call_user(term.what, term.fn, b, prompts, responses, metas)
                          if term.user
                          else checked_values(term.what, term.fn(prompts, responses, metas), b))
                value = torch.tensor(values, dtype=torch.float32)
            parts[term.key] = value
            if term.kind == "cost" and self.lagrangian:
                cost += term.weight * value
            elif term.kind == "cost":
                score -= term.weight * value
            else:
                score += term.weight * value
        score = score - self.missing_eos_penalty * (~has_eos.cpu()).float()
        return Scored(score, cost, parts)


class CompositeReward:
    """A ``RewardSpec`` with the reward model that feeds its model term."""

    def __init__(self, spec: RewardSpec,
                 reward_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None):
        self.spec = spec
        self.reward_model = reward_model

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, attention: torch.Tensor, prompts: list[str],
                 responses: list[str], metas: list[dict], has_eos: torch.Tensor) -> Scored:
        """Score a batch of (B, L) prompt + response ids; see ``RewardSpec.combine``."""
        raw = self.reward_model(ids, attention).cpu() if self.spec.has_model else None
        return self.spec.combine(raw, prompts, responses, metas, has_eos)

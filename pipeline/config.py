"""Typed configuration: dataclass defaults, then a YAML file, then dotted ``key=value`` overrides.

Every section is a dataclass with a comment under each field. ``load_config`` applies the three
layers in order and validates the result; every problem (unknown key, wrong type, contradictory
values) is collected and raised once as a ``ConfigError`` so the user fixes them in one go.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import shipped
from pipeline.data import column_problems


class ConfigError(ValueError):
    """Raised with every configuration problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# What a field accepts: written at the field, checked by validate()
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class OneOf:
    """The values a string field accepts."""

    # In the order the error message lists them.
    choices: tuple[str, ...]

    def problem(self, value: Any, nullable: bool = False) -> str | None:
        return None if value in self.choices else f"expected one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class Range:
    """The bounds of a number field; null passes an optional one."""

    # Lower bound.
    low: float
    # Upper bound; None = unbounded.
    high: float | None = None
    # The value must exceed low (> rather than >=).
    low_open: bool = False
    # The value must stay below high (< rather than <=).
    high_open: bool = False
    # Why the bound is there, appended to the message in parentheses.
    why: str = ""

    def problem(self, value: Any, nullable: bool = False) -> str | None:
        # A mistyped value was reported while loading; a number out of bounds is reported here.
        if not _is_number(value):
            return None
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if above and below:
            return None
        if self.high is None:
            expected = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            expected = (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                        f"{')' if self.high_open else ']'}")
        return (f"expected {expected}" + (" or null" if nullable else "")
                + (f" ({self.why})" if self.why else ""))


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
SCHEDULERS = OneOf(("linear", "cosine", "constant"))
PRECISIONS = OneOf(("no", "bf16", "fp16", "auto"))


def setting(default: Any, check: OneOf | Range) -> Any:
    """A field's default and the values it accepts. A subclass that restates the field with
    another default keeps this check (and the comment above it) unless it writes its own."""
    return field(default=default, metadata={"check": check})


def fields_in_order(cls: type) -> list[dataclasses.Field]:
    """A section's fields in the order help, ``config show`` and config.yaml list them: the
    section's own first, then each shared group's (the nearest base first), so a stage's
    inputs come before the optimizer settings it shares with the others."""
    mro = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]

    def home(f: dataclasses.Field) -> int:
        # The base that first declares the field; a restated default does not move it.
        return max(i for i, k in enumerate(mro) if f.name in vars(k).get("__annotations__", {}))

    return sorted(dataclasses.fields(cls), key=home)


def field_check(cls: type, name: str) -> OneOf | Range | None:
    """The check of field ``name`` of ``cls``: its own, else the nearest base class's."""
    for klass in cls.__mro__:
        spec = vars(klass).get("__dataclass_fields__", {}).get(name)
        if spec is not None and "check" in spec.metadata:
            return spec.metadata["check"]
    return None


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ScratchConfig:
    """Sizes of a random-init Llama-style model (``model.init=scratch``)."""

    # Width of the residual stream.
    hidden_size: int = setting(64, POSITIVE)
    # Transformer blocks.
    num_layers: int = setting(2, POSITIVE)
    # Attention heads (must divide hidden_size).
    num_heads: int = setting(4, POSITIVE)
    # Grouped-query attention: key/value heads (must divide num_heads).
    num_kv_heads: int = setting(2, POSITIVE)
    # Width of the MLP's hidden layer.
    intermediate_size: int = setting(256, POSITIVE)
    # Longest sequence (prompt + response) in tokens.
    max_position_embeddings: int = setting(512, POSITIVE)


@dataclass
class LoraConfig:
    """peft LoRA adapter settings; ``enabled=false`` means full fine-tuning."""

    # Train an adapter instead of every weight; it is merged into model/ when the stage saves.
    enabled: bool = False
    # Adapter rank.
    r: int = setting(16, POSITIVE)
    # The adapter's update is scaled by alpha / r.
    alpha: int = setting(32, POSITIVE)
    # LoRA dropout; RL stages force 0 (PPO needs deterministic forward passes).
    dropout: float = setting(0.0, NON_NEGATIVE)
    # Module names to adapt, or ["all-linear"].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    """The base policy model and tokenizer."""

    # "smollm2-135m-instruct" (packaged, offline), a local HF folder, or a hub id.
    name_or_path: str = "smollm2-135m-instruct"
    # "pretrained" loads name_or_path; "scratch" builds a random model of model.scratch sizes
    # that uses name_or_path's tokenizer.
    init: str = setting("pretrained", OneOf(("pretrained", "scratch")))
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Weights dtype: float32, bfloat16 or float16. float32 on CPU (bf16 matmuls are slow there).
    dtype: str = setting("float32", OneOf(("float32", "bfloat16", "float16")))
    # Run code shipped with a hub model. Off unless the user opts in.
    trust_remote_code: bool = False
    # System message for conversations that have none (baked into the saved chat template so
    # every later stage formats prompts alike); null keeps the template's own default.
    system_prompt: str | None = None
    # Hub revision (branch, tag or commit) for hub ids.
    revision: str | None = None
    # Where converted packaged models are cached; "" = $RLHF_CACHE or ~/.cache/rlhf-pipeline.
    cache_dir: str = ""


@dataclass
class DataConfig:
    """Datasets per stage: a data file (.jsonl/.json/.csv/.tsv/.parquet/.arrow, text ones also
    .gz/.bz2/.xz), a `save_to_disk` folder, or a hub id owner/name[:split]. The README lists
    the row forms each accepts (TRL's standard and conversational forms)."""

    # Demonstrations for SFT: "messages", "prompt"+"completion" or "text" rows.
    sft: str = "data/wordnet/sft.jsonl"
    # Prompts the label stage samples K responses for (each needs a reference).
    label: str = "data/wordnet/label.jsonl"
    # Prompts PPO trains on: "prompt" (a string or messages), optional "reference".
    ppo: str = "data/wordnet/ppo.jsonl"
    # Held-out prompts for evaluation (each needs a reference).
    eval: str = "data/wordnet/eval.jsonl"
    # Human rankings the reward and DPO stages train on instead of the label stage's output:
    # "chosen"+"rejected" (explicit or implicit prompt) or "responses"+"ranks" rows.
    ranked: str | None = None
    # Column renames, your column -> the name the pipeline reads (as Dataset.rename_columns):
    # {question: prompt} renames it in every file that has it; {ppo: {question: prompt}} in
    # data.ppo only, where the column must exist. Split keys: sft, label, ppo, eval, ranked
    # (data.ranked, rm.data and dpo.data).
    columns: dict = field(default_factory=dict)
    # Prompts longer than this (in tokens, after the chat template) are truncated from the left.
    max_prompt_tokens: int = setting(64, POSITIVE)


@dataclass
class PrecisionConfig:
    """Memory and arithmetic precision of a training stage (sft, rm, ppo, dpo)."""

    # Autocast: "no" (fp32), "bf16", "fp16" (GPUs only; fp32 on a CPU) or "auto" (bf16 on a
    # GPU that supports it, else fp32). Weights and optimizer state stay fp32 either way.
    mixed_precision: str = setting("no", PRECISIONS)
    # Recompute activations in the backward pass: less memory, more compute.
    gradient_checkpointing: bool = False


@dataclass
class TrainingConfig(PrecisionConfig):
    """The optimizer and loop of the stages that train on a fixed set of examples (sft, rm,
    dpo): AdamW, warm-up then decay, gradient accumulation, held-out evaluation, checkpoints.
    A stage restates only the defaults that differ."""

    # Passes over the training examples (when max_steps <= 0).
    epochs: int = setting(1, POSITIVE)
    # Optimizer steps; > 0 overrides epochs.
    max_steps: int = -1
    # Training examples per process per micro-batch: sequences (sft), prompts with all their K
    # responses (rm), preference pairs of two sequences each (dpo).
    batch_size: int = setting(8, POSITIVE)
    # Micro-batches accumulated per optimizer step.
    grad_accum_steps: int = setting(1, POSITIVE)
    # Peak AdamW learning rate (reached after warm-up).
    lr: float = setting(1e-5, POSITIVE)
    # AdamW weight decay (not applied to biases and norms).
    weight_decay: float = setting(0.0, NON_NEGATIVE)
    # Fraction of the optimizer steps over which the learning rate rises from 0.
    warmup_ratio: float = setting(0.05, Range(0, 1, high_open=True))
    # "linear", "cosine" or "constant" (after warm-up).
    lr_scheduler: str = setting("linear", SCHEDULERS)
    # The gradient is clipped to this global norm.
    max_grad_norm: float = setting(1.0, NON_NEGATIVE)
    # Longest prompt + response in tokens (dpo: must exceed data.max_prompt_tokens); longer
    # sequences are truncated from the right.
    max_seq_len: int = setting(128, POSITIVE)
    # Examples held out for evaluation before and after training: rows of data.sft (sft: the
    # eval loss), prompts (rm: accuracy and calibration; dpo: preference accuracy and margins).
    eval_size: int = setting(100, NON_NEGATIVE)
    # Evaluate on the held-out examples every N optimizer steps (0 = only before and after).
    eval_every: int = setting(0, NON_NEGATIVE)
    # Save a resumable checkpoint every N optimizer steps (0 = never).
    save_every: int = setting(0, NON_NEGATIVE)
    # Log the training metrics (loss, grad norm and the stage's own; means since the last log)
    # every N optimizer steps; also the interval of the progress line.
    log_every: int = setting(10, POSITIVE)


@dataclass
class SFTConfig(TrainingConfig):
    """Stage 1: supervised fine-tuning on demonstrations."""

    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    # Training rows used (None = all).
    train_size: int | None = setting(None, POSITIVE)
    # Prompts generated for samples.jsonl after training.
    num_samples: int = setting(4, NON_NEGATIVE)
    # Longest response of those samples, in tokens.
    max_new_tokens: int = setting(48, POSITIVE)
    # Measure the held-out loss before training too (eval_loss_before); runs that only need
    # the loss they end at (rlhf scaling's short runs) skip a pass over the eval rows.
    eval_before: bool = True


@dataclass
class AnnotatorsConfig:
    """Simulated annotators over the gold judge (AlpacaFarm style)."""

    # Annotators in the pool; each example is ranked by one of them, drawn at random.
    n: int = setting(4, POSITIVE)
    # Plackett-Luce sampling temperature over gold scores (0 = noiseless); spread 0.5x-1.5x
    # across the pool.
    temperature: float = setting(0.05, NON_NEGATIVE)
    # Probability an annotator swaps one random adjacent pair of its ranking.
    flip_prob: float = setting(0.1, PROBABILITY)


@dataclass
class LabelConfig:
    """Preference sampling: K responses per prompt from the SFT policy, ranked."""

    # SFT stage folder to sample from; "" = <run>/sft.
    policy: str = ""
    # Responses per prompt.
    k: int = setting(4, Range(2, why="a ranking needs two responses"))
    # Prompts of data.label used (None = all).
    num_prompts: int | None = setting(None, POSITIVE)
    # Sampling temperature of the K responses.
    temperature: float = setting(1.0, NON_NEGATIVE)
    # Nucleus sampling: keep the smallest set of tokens with this much mass (1.0 = all).
    top_p: float = setting(1.0, Range(0, 1, low_open=True))
    # Longest response in tokens.
    max_new_tokens: int = setting(48, POSITIVE)
    # Prompts per generate() call.
    batch_size: int = setting(16, POSITIVE)
    # Drop identical responses to a prompt (a prompt left with < 2 is skipped).
    dedup: bool = True
    # "minilm" (built-in) or "module:function".
    judge: str = "minilm"
    annotators: AnnotatorsConfig = field(default_factory=AnnotatorsConfig)


@dataclass
class RMConfig(TrainingConfig):
    """Stage 2: the reward model on ranked responses (K-way batches, Bradley-Terry)."""

    # Model the reward model starts from; "" = the SFT stage's model.
    base: str = ""
    # SFT stage folder (tokenizer check, normalization samples); "" = <run>/sft.
    sft: str = ""
    # Ranked JSONL; "" = data.ranked if set, else <run>/label/data.jsonl.
    data: str = ""
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Seed of the model's initialisation (score head, adapter) and of the data order; null =
    # run.seed. The held-out prompts follow run.seed either way, so reward models that differ
    # only here (the members of an ensemble, a seed-variance study) are scored on one set.
    seed: int | None = None
    # Bradley-Terry margin: loss = -log sigmoid(r_chosen - r_rejected - margin).
    margin: float = setting(0.0, NON_NEGATIVE)
    # Confidence bins of the held-out calibration error (ECE).
    calibration_bins: int = setting(10, POSITIVE)
    # SFT responses (to data.ppo prompts) used to set the normalization bias and scale.
    norm_samples: int = setting(128, NON_NEGATIVE)
    # Sampling temperature of those SFT responses.
    norm_temperature: float = setting(0.7, NON_NEGATIVE)
    # Longest of those responses, in tokens.
    max_new_tokens: int = setting(48, POSITIVE)


@dataclass
class RewardComponent:
    """One term of PPO's reward: the learned model, a rule, or a safety cost."""

    # "model" (the reward model), "rule" (a reward) or "cost" (a cost: higher = worse).
    type: str = setting("model", OneOf(("model", "rule", "cost")))
    # rule/cost: a built-in name (no_headword, length_bounds, profanity) or "module:function".
    name: str = ""
    # Weight in the reward sum (costs are subtracted unless ppo.lagrangian is on).
    weight: float = 1.0
    # Keyword arguments for a rule/cost function.
    params: dict = field(default_factory=dict)


@dataclass
class PPOConfig(PrecisionConfig):
    """Stage 3: PPO against the reward model with a KL penalty to the SFT reference."""

    # SFT stage folder (policy and reference); "" = <run>/sft.
    policy: str = ""
    # Reward-model stage folder (reward and critic init); "" = <run>/rm.
    reward_model: str = ""
    # PPO updates (one rollout batch each).
    num_updates: int = setting(100, POSITIVE)
    # Prompts per process per rollout; each is sampled ppo.samples_per_prompt times, so a
    # process's rollout holds batch_size * samples_per_prompt responses.
    batch_size: int = setting(16, POSITIVE)
    # Responses sampled per prompt (k). The group estimators (rloo, grpo) compare the k
    # responses to one prompt and need k >= 2; gae and reinforce_pp take any k >= 1.
    samples_per_prompt: int = setting(1, POSITIVE)
    # How the policy's advantages are estimated: "gae" (a critic initialized from the reward
    # model; GAE with gamma and lam), "rloo" (the mean reward of the prompt's other k - 1
    # responses as the baseline), "grpo" (the group's mean reward as the baseline, divided by
    # the group's std with ppo.grpo_std_normalize), "reinforce_pp" (REINFORCE++: the reward-to-
    # go of the per-token reward, whitened over the global batch). Only gae builds a critic.
    advantage_estimator: str = setting("gae", OneOf(("gae", "rloo", "grpo", "reinforce_pp")))
    # grpo: divide by the group's reward std (GRPO, OpenRLHF group_norm); false keeps the
    # mean-centred reward only (Dr. GRPO, OpenRLHF dr_grpo).
    grpo_std_normalize: bool = True
    # Minibatches each rollout batch (all batch_size * samples_per_prompt responses) is split
    # into per PPO epoch.
    num_minibatches: int = setting(1, POSITIVE)
    # Passes over each rollout batch.
    ppo_epochs: int = setting(4, POSITIVE)
    # Prompts of data.ppo used (None = all), cycled through in order.
    num_prompts: int | None = setting(None, POSITIVE)
    # Sampling: the same temperature divides the logits when scoring (item 6).
    temperature: float = setting(0.7, Range(0, low_open=True, why="PPO samples"))
    # Must stay 0 and 1.0: log-probs are scored on the full distribution, so a truncated
    # sampler would make the PPO ratio and the KL compare different distributions.
    top_k: int = setting(0, NON_NEGATIVE)
    # Must stay 1.0 (see top_k).
    top_p: float = setting(1.0, Range(0, 1, low_open=True))
    # Longest response in tokens; one that stops there without EOS gets missing_eos_penalty.
    response_length: int = setting(48, POSITIVE)
    # Subtracted from the score of a response that never emits EOS.
    missing_eos_penalty: float = setting(1.0, NON_NEGATIVE)
    # KL penalty coefficient beta (the initial value when adaptive).
    kl_coef: float = setting(0.05, NON_NEGATIVE)
    # Move kl_coef towards kl_target after each update (Ziegler et al. 2019).
    adaptive_kl: bool = False
    # Adaptive KL: the target KL to the reference per response, in nats.
    kl_target: float = setting(6.0, POSITIVE)
    # Adaptive KL: each update changes kl_coef by at most 20% x (episodes in the update) /
    # kl_horizon.
    kl_horizon: int = setting(10000, POSITIVE)
    # KL estimator: k1 (the log-ratio; unbiased per token), k2 (half its square) or k3 (the
    # non-negative unbiased estimate). k1 belongs in the reward, k2 or k3 in the loss.
    kl_estimator: str = setting("k1", OneOf(("k1", "k2", "k3")))
    # Where the KL to the reference acts: "reward" (-kl_coef * KL per token in the reward; the
    # group estimators subtract kl_coef times the response's summed KL from its reward before
    # the baseline) or "loss" (kl_coef * the token-mean KL estimate added to the policy loss,
    # as in GRPO). kl_coef, and the adaptive controller, serve both.
    kl_in: str = setting("reward", OneOf(("reward", "loss")))
    # Normalized scores are clipped to [-reward_clip, reward_clip].
    reward_clip: float = setting(5.0, POSITIVE)
    # Rescale the per-token rewards (mean kept) before gae or reinforce_pp.
    whiten_rewards: bool = False
    # Normalize the advantages over all valid tokens of the global batch: gae and reinforce_pp.
    # rloo and grpo are centred by their group baseline and are not whitened.
    whiten_advantages: bool = True
    # Discount of gae and of reinforce_pp's reward-to-go; rloo and grpo score whole responses.
    gamma: float = setting(1.0, PROBABILITY)
    # GAE lambda (gae only).
    lam: float = setting(0.95, PROBABILITY)
    # PPO's clip of the probability ratio: 1 +- clip_range.
    clip_range: float = setting(0.2, NON_NEGATIVE)
    # New value predictions are clipped to within this of the rollout's.
    clip_range_value: float = setting(0.2, NON_NEGATIVE)
    # Value-loss coefficient (the critic's loss is scaled by it; the critic has its own
    # optimizer).
    vf_coef: float = setting(0.1, NON_NEGATIVE)
    # Entropy bonus in the policy loss (0 = off).
    entropy_coef: float = setting(0.0, NON_NEGATIVE)
    # Policy learning rate (Adam).
    lr: float = setting(3e-6, POSITIVE)
    # Critic learning rate (Adam).
    critic_lr: float = setting(5e-6, POSITIVE)
    # Adam epsilon of both optimizers.
    adam_eps: float = setting(1e-5, POSITIVE)
    # Adam (L2) weight decay of both optimizers.
    weight_decay: float = setting(0.0, NON_NEGATIVE)
    # "linear" decays to 0 over num_updates; "constant" keeps it.
    lr_scheduler: str = setting("linear", OneOf(("linear", "constant")))
    # The policy's and the critic's gradients are each clipped to this norm.
    max_grad_norm: float = setting(1.0, NON_NEGATIVE)
    # Updates that train only the critic before the policy moves.
    critic_warmup_updates: int = setting(0, NON_NEGATIVE)
    # LoRA mode: the policy is an adapter on the SFT model (the reference is the same base
    # with the adapter off), the critic an adapter on the reward model.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # PPO-ptx: coefficient of the LM loss on SFT demonstrations (0 = off).
    ptx_coef: float = setting(0.0, NON_NEGATIVE)
    # Demonstrations (from data.sft) per minibatch of the PPO-ptx LM loss.
    ptx_batch_size: int = setting(8, POSITIVE)
    # Reward terms; the default is the learned reward model alone.
    rewards: list[RewardComponent] = field(default_factory=lambda: [RewardComponent()])
    # Enforce costs as a constraint (PPO-Lagrangian) instead of subtracting them.
    lagrangian: bool = False
    # PPO-Lagrangian: the multiplier's starting value.
    lambda_init: float = setting(1.0, NON_NEGATIVE)
    # PPO-Lagrangian: lambda += lambda_lr * (mean cost - cost_threshold) after each update.
    lambda_lr: float = setting(0.1, NON_NEGATIVE)
    # PPO-Lagrangian: lambda stays in [0, lambda_max].
    lambda_max: float = setting(5.0, NON_NEGATIVE)
    # Constraint: mean episode cost (weighted sum of the cost terms) <= cost_threshold. 0.1
    # suits the [0, 1] profanity probability: clean WordNet definitions average 0.06, while
    # a threshold of 0 could never be met and would drive lambda to lambda_max.
    cost_threshold: float = 0.1
    # Gold judge scored on every rollout for the curves ("" = off); never used as reward.
    gold_judge: str = "minilm"
    # Forward-pass batch for scoring (reference, reward, values); 0 = whole rollout.
    forward_batch_size: int = setting(0, NON_NEGATIVE)
    # Log the update's metrics every N updates; also the interval of the progress line.
    log_every: int = setting(1, POSITIVE)
    # Log a table of sample responses every N updates.
    sample_every: int = setting(10, NON_NEGATIVE)
    # Save a resumable checkpoint every N updates (0 = never).
    save_every: int = setting(0, NON_NEGATIVE)
    # Also save the policy's model/ every N updates for the overoptimization view (0 = never).
    snapshot_every: int = setting(0, NON_NEGATIVE)


@dataclass
class DpoStageConfig(TrainingConfig):
    """DPO with TRL's DPOTrainer on the ranked responses: no reward model, no PPO.

    The SFT policy is trained against itself as the frozen reference, on the same preferences
    the reward model learns."""

    lr: float = 5e-6
    # SFT stage folder (policy and reference; tokenizer check); "" = <run>/sft.
    sft: str = ""
    # Ranked JSONL; "" = data.ranked if set, else <run>/label/data.jsonl.
    data: str = ""
    # Pairs a prompt's ranking yields: "best_worst" (its best response against its worst, one
    # pair per prompt) or "all" (every strictly ordered pair, C(K,2) for K distinct ranks).
    pairs: str = setting("best_worst", OneOf(("best_worst", "all")))
    # KL strength: the implicit reward is beta * log(pi / pi_ref); higher stays closer to SFT.
    beta: float = setting(0.1, POSITIVE)
    # TRL loss: "sigmoid" (DPO), "ipo", "hinge" (SLiC) or "robust" (noisy labels; with
    # label_smoothing as the flip rate).
    loss_type: str = setting("sigmoid", OneOf(("sigmoid", "ipo", "hinge", "robust")))
    # Assumed probability that a preference label is flipped ("robust"; 0 elsewhere = plain).
    label_smoothing: float = setting(
        0.0, Range(0, 0.5, high_open=True, why="a flip rate of 0.5 or more is no preference"))
    # LoRA mode: the policy is an adapter on the SFT model and the reference is the same model
    # with the adapter off (one copy of the weights).
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Prompts of data.eval generated for samples.jsonl after training (greedy).
    num_samples: int = setting(4, NON_NEGATIVE)
    # Longest response of those samples, in tokens.
    max_new_tokens: int = setting(48, POSITIVE)
    # Also save the policy's model/ every N steps for the overoptimization view (0 = never).
    snapshot_every: int = setting(0, NON_NEGATIVE)


@dataclass
class EvalConfig:
    """Evaluation of the base, SFT, PPO and DPO policies on the held-out split."""

    # SFT stage folder; "" = the same run's (as for every stage folder here).
    sft: str = ""
    # PPO stage folder; without one (none in the run) PPO is not evaluated.
    ppo: str = ""
    # DPO stage folder; without one (none in the run) DPO is not evaluated.
    dpo: str = ""
    # Reward-model stage folder; "" = the run's rm/, else the one the PPO stage trained
    # against. Without any there are no RM scores or best-of-N.
    reward_model: str = ""
    # Prompts of data.eval used (None = all).
    num_prompts: int | None = setting(None, POSITIVE)
    # Sampling temperature of every policy (the same sampler seed for each).
    temperature: float = setting(0.7, NON_NEGATIVE)
    # Longest response in tokens.
    max_new_tokens: int = setting(48, POSITIVE)
    # Prompts per generate() call and per scoring batch.
    batch_size: int = setting(16, POSITIVE)
    # Evaluate the base model too: its row, the win rates against it and SFT's KL to it.
    base: bool = True
    # Gold judge: "minilm" (built-in) or "module:function".
    judge: str = "minilm"
    # Best-of-N baseline: per prompt, the SFT sample the reward model scores highest out of N
    # (needs a reward model); 0 or 1 = off.
    best_of_n: int = setting(4, NON_NEGATIVE)
    # Bootstrap resamples for confidence intervals.
    bootstrap: int = setting(1000, NON_NEGATIVE)
    # Confidence bins of the calibration probe's ECE.
    calibration_bins: int = setting(10, POSITIVE)
    # Questions of the calibration probe (the first N eval words; None = one per eval prompt;
    # 0 = no probe). Each reads four definitions, so the probe costs several times a policy's
    # sampling.
    calibration_questions: int | None = setting(None, NON_NEGATIVE)


@dataclass
class RunConfig:
    """Where the run lives and how it executes."""

    # Folder of the runs.
    root: str = "runs"
    # The run's folder under root: its stages are <root>/<name>/<stage>/.
    name: str = "default"
    # Seed of the random draws (process i of a distributed run starts from seed + i).
    seed: int = 0
    # Continue a killed stage from its last checkpoint in <stage>/checkpoints/.
    resume: bool = False
    # Replace a stage that already finished (otherwise re-running it is refused).
    overwrite: bool = False
    # torch intra-op threads per process; 0 = the machine's cores / local processes.
    threads: int = setting(0, NON_NEGATIVE)
    # `rlhf seeds`: the seeds whose label -> rm -> ppo -> eval chains run (SFT is shared).
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # `rlhf seeds`: chains run at the same time; each gets run.threads threads, or, with
    # run.threads=0, the machine's cores divided among them.
    seed_jobs: int = setting(1, POSITIVE)
    # "auto" (GPU when present), or "cpu".
    device: str = setting("auto", OneOf(("auto", "cpu")))
    # Upload the model/ folder (weights, tokenizer, model card) of every stage that trains one
    # to the Hugging Face hub once the stage is complete. The token is huggingface_hub's own:
    # the HF_TOKEN environment variable or a saved `hf auth login`, never a config key.
    push_to_hub: bool = False
    # The hub repo: "{stage}" in it is replaced by the stage name; without it "-<stage>" is
    # appended (user/wordnet-rlhf -> user/wordnet-rlhf-sft, -rm, -ppo). "{run}" is replaced by
    # run.name (one repo per seed under `rlhf seeds`).
    hub_model_id: str = ""
    # Create the hub repos as private ones (an existing repo keeps its visibility).
    hub_private: bool = False


@dataclass
class TrackingConfig:
    """Dashboards. metrics.jsonl is always written."""

    # Log to Weights & Biases as well.
    wandb: bool = False
    # wandb project.
    wandb_project: str = "rlhf-pipeline"
    # wandb team or user; null = the account's default.
    wandb_entity: str | None = None
    # "offline" (default: no key needed, `wandb sync` later), "online" or "disabled".
    wandb_mode: str = setting("offline", OneOf(("offline", "online", "disabled")))
    # Write TensorBoard event files to <stage>/tensorboard/.
    tensorboard: bool = False
    # Progress: a bar in a terminal; anywhere else (a file, a pipe, CI) one line per logging
    # interval with the step, the stage's main figures and the ETA. false = neither.
    progress: bool = True
    # The libraries' own output: transformers' weight-loading and saving bars and load reports
    # (the "MISSING, newly initialized" table of a fresh reward head), hub and datasets bars,
    # and their deprecation warnings. Off by default (their errors still show).
    library_logs: bool = False


# Every stage `rlhf pipeline` can run, in the only order their inputs allow.
PIPELINE_STAGES = ("sft", "label", "rm", "ppo", "dpo", "eval", "report")


@dataclass
class PipelineConfig:
    """What `rlhf pipeline` runs (and `rlhf seeds` after the shared SFT stage)."""

    # Stages in order, a subsequence of sft, label, rm, ppo, dpo, eval, report. dpo is off
    # unless listed (configs/compare.yaml lists it next to ppo); leaving out rm and ppo gives
    # a DPO-only run.
    stages: list[str] = field(
        default_factory=lambda: ["sft", "label", "rm", "ppo", "eval", "report"])


@dataclass
class ScalingConfig:
    """`rlhf scaling`: small runs predict the full run's SFT loss and reward-model accuracy.

    The full-size stages then train and check the predictions; Gao et al.'s overoptimization
    forms are fitted to the PPO snapshots and best-of-n."""

    # SFT short runs, as fractions of the full run's optimizer steps (each a complete run with
    # its own schedule); at least 4 distinct step counts, since a*C^b + c has 3 parameters.
    sft_fractions: list[float] = field(default_factory=lambda: [0.0625, 0.125, 0.25, 0.375, 0.5])
    # Reward models on nested subsets of the labelled training prompts, as fractions of them;
    # every one is scored on the full reward model's held-out prompts (rm.eval_size). Up to a
    # quarter: together they cost under half of the full reward model (15/32 of its steps).
    rm_fractions: list[float] = field(default_factory=lambda: [0.03125, 0.0625, 0.125, 0.25])
    # Processes the command spreads its work over, each with run.threads / jobs threads
    # (run.threads=0: the machine's cores / jobs; at least 1): the small runs train side by
    # side, one per process, and on a CPU the sampling stages (label, eval) are sharded across
    # a gloo group of that many processes. On a 2-core Xeon the default's small reward models
    # (then up to 1/2) took 9.8 minutes two at a time against 12.6 in turn; the short SFT runs
    # gained nothing (5.7 against 5.5): what a one-thread process gains depends on how well
    # the stage uses a second thread, and decoding uses it least. 1 = all in this process.
    jobs: int = setting(2, POSITIVE)
    # Held-out accuracy (vs gold and vs annotators) whose number of training comparisons is
    # predicted: how many labels a reward model this good needs.
    target_accuracy: float = 0.7
    # Overoptimization holdout: the fit reads the PPO points up to this fraction of
    # ppo.num_updates and predicts the later ones.
    early_fraction: float = 0.5
    # PPO policies on the overoptimization curve (snapshots and the final policy): sets
    # ppo.snapshot_every to ppo.num_updates // ppo_points unless snapshots are already as dense.
    ppo_points: int = 6
    # Prompts of the eval stage this command runs (None = eval.num_prompts), which then skips
    # the calibration probe and the base model: the overoptimization fits read gold and KL
    # from SFT on, and at the default's 300 prompts and 100 questions the eval of its nine
    # policies took a third of the command's time.
    eval_prompts: int | None = setting(128, POSITIVE)
    # Train PPO and evaluate for the overoptimization fits (the longest part); false stops
    # after the SFT and reward-model checks.
    overoptimization: bool = True
    # Two-sided level of every interval.
    level: float = 0.95


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DpoStageConfig = field(default_factory=DpoStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


# ---------------------------------------------------------------------------------------------
# Validation of values (types are checked while loading)
# ---------------------------------------------------------------------------------------------


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _optional(tp: Any) -> bool:
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(tp))


def _field_problems(section: Any, prefix: str) -> list[str]:
    """Every field of ``section`` (and of the sections and list items in it) against the check
    written at the field."""
    problems = []
    hints = _hints(type(section))
    for f in fields_in_order(type(section)):
        key, value = f"{prefix}.{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            problems += _field_problems(value, key)
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    problems += _field_problems(item, f"{key}[{i}]")
        check = field_check(type(section), f.name)
        nullable = _optional(hints[f.name])
        if check is None or (value is None and nullable):
            continue
        problem = check.problem(value, nullable)
        if problem:
            problems.append(f"{key}={value!r}: {problem}")
    return problems


def _validate_rewards(ppo: PPOConfig) -> list[str]:
    problems = []
    if not ppo.rewards:
        problems.append("ppo.rewards: expected at least one reward component")
    for i, comp in enumerate(ppo.rewards):
        if comp.type in ("rule", "cost") and not comp.name:
            problems.append(f"ppo.rewards[{i}].name: a {comp.type} component needs a built-in "
                            "name or module:function")
    if ppo.lagrangian and not any(c.type == "cost" for c in ppo.rewards):
        problems.append("ppo.lagrangian=true but ppo.rewards has no cost component")
    if sum(c.type == "model" for c in ppo.rewards) > 1:
        problems.append("ppo.rewards: at most one model component")
    return problems


GROUP_ESTIMATORS = ("rloo", "grpo")


def _validate_estimator(ppo: PPOConfig) -> list[str]:
    """The advantage estimator against the settings it cannot honour."""
    est = ppo.advantage_estimator
    what = f"ppo.advantage_estimator={est}"
    problems = []
    if est in GROUP_ESTIMATORS and ppo.samples_per_prompt < 2:
        # With one response per prompt the group baseline is the response itself: every
        # advantage is 0 and training would run without moving the policy.
        problems.append(f"ppo.samples_per_prompt={ppo.samples_per_prompt}: {what} compares the "
                        "responses to one prompt and needs ppo.samples_per_prompt >= 2")
    if ppo.kl_in == "loss" and ppo.kl_estimator == "k1":
        problems.append("ppo.kl_estimator=k1 with ppo.kl_in=loss: the gradient of the k1 loss "
                        "is zero in expectation (E[grad log pi] = 0), so it adds noise and no "
                        "pull to the reference; use k2 (its gradient is KL's) or k3 (GRPO's)")
    if est == "gae":
        return problems
    if ppo.lagrangian:
        problems.append(f"ppo.lagrangian=true with {what}: the Lagrangian's cost advantages "
                        "come from a cost critic, which only gae has")
    if ppo.critic_warmup_updates:
        problems.append(f"ppo.critic_warmup_updates={ppo.critic_warmup_updates} with {what}: "
                        "there is no critic to warm up; expected 0")
    if est in GROUP_ESTIMATORS and ppo.gamma != 1.0:
        problems.append(f"ppo.gamma={ppo.gamma} with {what}: the group baseline scores whole "
                        "responses, with nothing to discount; expected 1.0")
    if est in GROUP_ESTIMATORS and ppo.whiten_rewards:
        problems.append(f"ppo.whiten_rewards=true with {what}: the group baseline already "
                        "centres each response's reward; expected false")
    return problems


def advisories(cfg: Config) -> list[str]:
    """Settings that run but that the reference implementations advise against, one line
    each (printed when the stage starts)."""
    ppo = cfg.ppo
    notes = []
    if ppo.kl_in == "reward" and ppo.kl_estimator != "k1":
        notes.append(f"ppo.kl_estimator={ppo.kl_estimator} with ppo.kl_in=reward: as a reward "
                     "only k1 makes the policy gradient the gradient of the KL (OpenRLHF "
                     "and the PPO references use k1 there; k2/k3 are meant for ppo.kl_in=loss)")
    if (ppo.advantage_estimator == "grpo" and ppo.grpo_std_normalize and ppo.kl_in == "reward"
            and ppo.kl_coef > 0):
        notes.append("ppo.advantage_estimator=grpo with ppo.kl_in=reward: the KL penalty is "
                     "divided by each group's reward std with the score, so its weight varies "
                     "from prompt to prompt; GRPO (DeepSeekMath, veRL) puts it in the loss: "
                     "ppo.kl_in=loss ppo.kl_estimator=k3")
    return notes


def _validate_dpo(cfg: Config) -> list[str]:
    c = cfg.dpo
    problems = []
    if c.max_seq_len <= cfg.data.max_prompt_tokens:
        problems.append(f"dpo.max_seq_len={c.max_seq_len}: expected > data.max_prompt_tokens="
                        f"{cfg.data.max_prompt_tokens}, so a full-length prompt keeps response "
                        "tokens to compare")
    # Out of [0, 0.5) is reported at the field.
    if 0 < c.label_smoothing < 0.5 and c.loss_type != "robust":
        problems.append(f"dpo.label_smoothing={c.label_smoothing}: only dpo.loss_type=robust "
                        f"reads it (dpo.loss_type={c.loss_type!r})")
    return problems


def _validate_pipeline(p: PipelineConfig) -> list[str]:
    unknown = [s for s in p.stages if s not in PIPELINE_STAGES]
    if unknown:
        return [f"pipeline.stages: unknown stage {unknown[0]!r}; expected some of "
                f"{', '.join(PIPELINE_STAGES)}"]
    if not p.stages:
        return ["pipeline.stages=[]: expected at least one stage"]
    order = [PIPELINE_STAGES.index(s) for s in p.stages]
    if order != sorted(set(order)):
        return [f"pipeline.stages={p.stages}: expected each stage once, in the order "
                f"{', '.join(PIPELINE_STAGES)} (a stage runs after the ones it reads)"]
    return []


_JUDGE_KEYS = ("label.judge", "ppo.gold_judge", "eval.judge")


def _import_function(key: str, spec: str) -> tuple[Any, str | None]:
    """(the callable "module:function" names, None) or (None, the problem)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        return None, f'{key}={spec!r}: expected "module:function"'
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything while it is imported
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return None, (f"{key}={spec!r}: cannot import module {module_name!r} "
                      f"({type(exc).__name__}: {first})")
    for part in attr.split("."):
        if not hasattr(obj, part):
            return None, f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}"
        obj = getattr(obj, part)
    if not callable(obj):
        return None, f"{key}={spec!r}: {attr!r} is not callable ({type(obj).__name__})"
    return obj, None


def _check_signature(key: str, spec: str, fn: Any, third: str, params: dict) -> str | None:
    """Whether ``fn(prompts, responses, <third>, **params)`` binds to the signature."""
    try:
        inspect.signature(fn).bind([], [], [], **params)
    except TypeError as exc:
        extra = "".join(f", {k}=..." for k in params)
        return f"{key}={spec!r}: cannot be called as f(prompts, responses, {third}{extra}): {exc}"
    except ValueError:  # no introspectable signature (some builtins): the call decides
        pass
    return None


def _validate_callables(cfg: Config) -> list[str]:
    """Rule/cost names and judges resolved now, so a typo or a broken user module is one line
    at start rather than a traceback after the models loaded. Importing a "module:function"
    runs that module's top-level code, as the stage would."""
    problems = []
    for i, comp in enumerate(cfg.ppo.rewards):
        if comp.type not in ("rule", "cost") or not comp.name:
            continue
        key = f"ppo.rewards[{i}].name"
        if ":" in comp.name:
            fn, problem = _import_function(key, comp.name)
        else:
            # Imported here, not at the top: stages depend on this module, not the reverse.
            from stages.rewards import BUILTIN_RULES

            fn = BUILTIN_RULES.get(comp.name)
            problem = None if fn is not None else (
                f"{key}={comp.name!r}: unknown rule; expected one of "
                f"{', '.join(BUILTIN_RULES)} or \"module:function\"")
        if problem is None and not isinstance(comp.params, dict):
            problem = f"ppo.rewards[{i}].params={comp.params!r}: expected a mapping"
        if problem is None:
            problem = _check_signature(key, comp.name, fn, "metas", comp.params)
        if problem:
            problems.append(problem)
    for key in _JUDGE_KEYS:
        spec = _get(cfg, key)
        if spec == "minilm" or (key == "ppo.gold_judge" and spec == ""):
            continue
        if ":" not in spec:
            problems.append(f"{key}={spec!r}: unknown judge; expected \"minilm\" or "
                            "\"module:function\"" + (" (or \"\" for none)"
                                                      if key == "ppo.gold_judge" else ""))
            continue
        fn, problem = _import_function(key, spec)
        problem = problem or _check_signature(key, spec, fn, "references", {})
        if problem:
            problems.append(problem)
    return problems


def _validate_run_root(run: RunConfig) -> list[str]:
    """run.root and the run folder must be folders (or not exist yet): a file there would
    only fail when the first stage creates its folder."""
    for path, what in ((Path(run.root), f"run.root={run.root!r}"),
                       (Path(run.root) / run.name, f"run.root/run.name ({run.root}/{run.name})")):
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            return [f"{what}: {existing} is a file, expected a folder"]
    return []


_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def hub_repo_id(run: RunConfig, stage: str) -> str:
    """The hub repo a stage's model goes to (see ``run.hub_model_id``)."""
    template = run.hub_model_id.replace("{run}", run.name)
    return template.replace("{stage}", stage) if "{stage}" in template else f"{template}-{stage}"


def _validate_hub(run: RunConfig) -> list[str]:
    if not run.hub_model_id:
        return (["run.push_to_hub=true needs run.hub_model_id (e.g. your-name/wordnet-rlhf)"]
                if run.push_to_hub else [])
    repo = hub_repo_id(run, "sft")
    if not _REPO_ID.fullmatch(repo) or len(repo.split("/")[-1]) > 96 or ".." in repo:
        return [f"run.hub_model_id={run.hub_model_id!r}: expected a hub repo id, \"name\" or "
                "\"owner/name\" (letters, digits, '-', '_', '.')"]
    return []


def validate(cfg: Config) -> list[str]:
    """Every field against its own check, then what spans fields. Returns every problem found."""
    problems = []
    for f in dataclasses.fields(cfg):
        problems += _field_problems(getattr(cfg, f.name), f.name)
    s = cfg.model.scratch
    if s.num_heads > 0 and s.num_kv_heads > 0 and s.num_heads % s.num_kv_heads:
        problems.append(
            f"model.scratch.num_kv_heads={s.num_kv_heads}: must divide "
            f"model.scratch.num_heads={s.num_heads}"
        )
    if s.num_heads > 0 and s.hidden_size % s.num_heads:
        problems.append(
            f"model.scratch.hidden_size={s.hidden_size}: must be a multiple of "
            f"model.scratch.num_heads={s.num_heads}"
        )
    if not cfg.run.seeds:
        problems.append("run.seeds=[]: expected at least one seed")
    elif len(set(cfg.run.seeds)) != len(cfg.run.seeds):
        problems.append(f"run.seeds={cfg.run.seeds}: expected distinct seeds")
    if cfg.ppo.top_k > 0:
        problems.append(f"ppo.top_k={cfg.ppo.top_k}: PPO scores log-probs on the full "
                        "distribution, so sampling must not truncate it; expected 0")
    if 0 < cfg.ppo.top_p < 1:
        problems.append(f"ppo.top_p={cfg.ppo.top_p}: PPO scores log-probs on the full "
                        "distribution, so sampling must not truncate it; expected 1.0")
    episodes = cfg.ppo.batch_size * cfg.ppo.samples_per_prompt
    if cfg.ppo.num_minibatches <= 0:
        pass  # reported at the field
    elif cfg.ppo.samples_per_prompt == 1 and cfg.ppo.batch_size % cfg.ppo.num_minibatches:
        problems.append(f"ppo.num_minibatches={cfg.ppo.num_minibatches}: must divide "
                        f"ppo.batch_size={cfg.ppo.batch_size}")
    elif episodes % cfg.ppo.num_minibatches:
        problems.append(f"ppo.num_minibatches={cfg.ppo.num_minibatches}: must divide the "
                        f"{episodes} responses of a rollout (ppo.batch_size={cfg.ppo.batch_size}"
                        f" x ppo.samples_per_prompt={cfg.ppo.samples_per_prompt})")
    problems += _validate_estimator(cfg.ppo)
    problems += _validate_rewards(cfg.ppo)
    problems += _validate_dpo(cfg)
    problems += _validate_pipeline(cfg.pipeline)
    problems += _validate_callables(cfg)
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        problems.append(f"run.name={cfg.run.name!r}: expected a plain folder name")
    else:
        problems += _validate_run_root(cfg.run)
    if cfg.run.resume and cfg.run.overwrite:
        problems.append("run.resume=true and run.overwrite=true contradict each other")
    if isinstance(cfg.data.columns, dict):
        problems += column_problems(cfg.data.columns)
    problems += _validate_hub(cfg.run)
    if cfg.model.init == "scratch" and cfg.model.lora.enabled:
        problems.append("model.lora.enabled=true with model.init=scratch: LoRA needs pretrained "
                        "weights to adapt; use full fine-tuning for a scratch model")
    return problems


# ---------------------------------------------------------------------------------------------
# Loading: defaults <- YAML <- overrides, with type checks
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return the (lightly converted) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"{key}={value!r}: expected {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            problems.append(f"{key}={value!r}: expected {_type_name(tp)}")
            return value
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}={value!r}: expected a mapping of {tp.__name__} fields")
            return tp()
        return _build(tp, value, key, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; a float field means the number.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}={value!r}: expected a number")
            return value
        # nan passes every range check (all comparisons are false) and inf overflows later;
        # no float setting of the pipeline means either.
        if not math.isfinite(value):
            problems.append(f"{key}={value!r}: expected a finite number")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML reads `name: 123` as an int; a string field takes it as text.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(f"{key}={value!r}: expected a string")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}={value!r}: expected a mapping")
        return value
    if tp is Any:
        return value
    problems.append(f"{key}: unsupported field type {tp}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: dict, prefix: str, problems: list[str], base: Any = None) -> Any:
    """Instantiate ``cls`` from ``base`` (or defaults) updated with ``values``. A key
    ``(name, i)`` (from ``name[i]`` in a dotted override) sets item i of the list ``name``,
    after every whole value is set."""
    obj = base if base is not None else cls()
    hints = _hints(cls)
    for name, value in sorted(values.items(), key=lambda item: isinstance(item[0], tuple)):
        field_name, index = name if isinstance(name, tuple) else (name, None)
        key = f"{prefix}.{field_name}" if prefix else str(field_name)
        if field_name not in hints:
            problems.append(f"{key}: unknown key (valid: {', '.join(sorted(hints))})")
            continue
        tp = hints[field_name]
        current = getattr(obj, field_name)
        if index is not None:
            _set_item(obj, field_name, tp, index, value, key, problems)
        elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, field_name, _build(tp, value, key, problems, base=current))
        else:
            check = next(f.metadata.get("check") for f in dataclasses.fields(cls)
                         if f.name == field_name)
            if value is False and isinstance(check, OneOf) and "no" in check.choices:
                # YAML 1.1 reads an unquoted `no` as false (mixed_precision=no).
                value = "no"
            before = len(problems)
            coerced = _coerce(value, tp, key, problems)
            # A mistyped value (already reported) keeps the previous one, so the value checks
            # in validate() still run on sound types and report every other problem too.
            if len(problems) == before:
                setattr(obj, field_name, coerced)
    return obj


def _set_item(obj: Any, name: str, tp: Any, index: int, value: Any, key: str,
              problems: list[str]) -> None:
    """Item ``index`` of the list field ``name``: a mapping updates a section item (as a
    mapping updates a section), anything else replaces the item."""
    where = f"{key}[{index}]"
    if typing.get_origin(tp) is not list:
        problems.append(f"{where}: {key} is a {_type_name(tp)}, not a list")
        return
    items = getattr(obj, name)
    if index >= len(items):
        count = f"{len(items)} item" + ("" if len(items) == 1 else "s")
        problems.append(f"{where}: no such item ({key} has {count}); set {key}=[...] to add "
                        "or remove items")
        return
    (item_tp,) = typing.get_args(tp)
    before = len(problems)
    if dataclasses.is_dataclass(item_tp) and isinstance(value, dict):
        item = _build(item_tp, value, where, problems, base=copy.deepcopy(items[index]))
    else:
        item = _coerce(value, item_tp, where, problems)
    if len(problems) == before:
        setattr(obj, name, [*items[:index], item, *items[index + 1:]])


def parse_override(text: str) -> tuple[str, Any]:
    """``"ppo.kl_coef=0.02"`` -> ``("ppo.kl_coef", 0.02)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError([f"{text!r}: expected key=value (e.g. sft.lr=1e-4)"])
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


_ITEM = re.compile(r"(\w+)\[(\d+)\]")


def _nest(dotted: dict[str, Any], problems: list[str]) -> dict:
    """``{"ppo.lr": 1, "ppo.rewards[0].weight": 2}`` -> ``{"ppo": {"lr": 1, ("rewards", 0):
    {"weight": 2}}}``: a list item's key is the pair (field, index). A malformed key is a
    problem and is left out."""
    tree: dict = {}
    for key, value in dotted.items():
        names = key.split(".")
        parts: list[Any] = []
        for name in names:
            item = _ITEM.fullmatch(name)
            if item is not None:
                parts.append((item[1], int(item[2])))
            elif "[" in name or "]" in name:
                problems.append(f"{key}: expected name[N] with N = 0, 1, ... for a list item, "
                                f"got {name!r}")
                break
            else:
                parts.append(name)
        if len(parts) < len(names):
            continue
        node = tree
        for name, part in zip(names[:-1], parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{key}: {name} is not a section")
                break
        else:
            node[parts[-1]] = value
    return tree


def load_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then ``config_file``, then ``overrides``; raise ConfigError listing all problems."""
    problems: list[str] = []
    cfg = Config()
    if config_file is not None:
        path = shipped.resolve_config(config_file)
        if not path.is_file():
            names = ", ".join(n for n in shipped.configs() if "/" not in n)
            raise ConfigError([f"{path}: no such config file"
                               + (f" or shipped config (shipped: {names})" if names else "")])
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError([f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})"]) from None
        if not isinstance(values, dict):
            raise ConfigError([f"{path}: expected a mapping of sections at the top level"])
        file_problems: list[str] = []
        cfg = _build(Config, values, "", file_problems, base=cfg)
        problems += [f"{path}: {p}" for p in file_problems]
    parsed = dict(parse_override(o) for o in overrides)
    cfg = _build(Config, _nest(parsed, problems), "", problems, base=cfg)
    # The shipped data (the defaults) from any working directory.
    for f in dataclasses.fields(cfg.data):
        value = getattr(cfg.data, f.name)
        if isinstance(value, str):
            setattr(cfg.data, f.name, shipped.data_file(value))
    # A wrongly typed value (already reported) may break a cross-key check.
    with contextlib.suppress(TypeError):
        problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> Any:
    """``dataclasses.asdict``, each section's keys in ``fields_in_order``."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields_in_order(type(cfg))}
    if isinstance(cfg, dict):
        return {key: to_dict(value) for key, value in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(to_dict(value) for value in cfg)
    return copy.deepcopy(cfg)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"ppo.lora.r": 16, ...}``; lists stay one value."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def key_matches(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of ``patterns``, or under one that ends in a dot."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_sha256(cfg: Any) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()

"""Typed configuration: dataclass defaults, then a YAML file, then dotted ``key=value`` overrides.

Every section is a dataclass with a comment under each field. ``load_config`` applies the three
layers in order and validates the result; every problem (unknown key, wrong type, contradictory
values) is collected and raised once as a ``ConfigError`` so the user fixes them in one go.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Raised with every configuration problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ScratchConfig:
    """Sizes of a random-init Llama-style model (``model.init=scratch``)."""

    hidden_size: int = 64
    # Transformer blocks.
    num_layers: int = 2
    num_heads: int = 4
    # Grouped-query attention: key/value heads (must divide num_heads).
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512


@dataclass
class LoraConfig:
    """peft LoRA adapter settings; ``enabled=false`` means full fine-tuning."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    # LoRA dropout; RL stages force 0 (PPO needs deterministic forward passes).
    dropout: float = 0.0
    # Module names to adapt, or ["all-linear"].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    """The base policy model and tokenizer."""

    # "smollm2-135m-instruct" (packaged, offline), a local HF folder, or a hub id.
    name_or_path: str = "smollm2-135m-instruct"
    # "pretrained" loads name_or_path; "scratch" builds a random model of model.scratch sizes
    # that uses name_or_path's tokenizer.
    init: str = "pretrained"
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Weights dtype: float32, bfloat16 or float16. float32 on CPU (bf16 matmuls are slow there).
    dtype: str = "float32"
    # Run code shipped with a hub model. Off unless the user opts in.
    trust_remote_code: bool = False
    # Hub revision (branch, tag or commit) for hub ids.
    revision: str | None = None
    # Where converted packaged models are cached; "" = $RLHF_CACHE or ~/.cache/rlhf-pipeline.
    cache_dir: str = ""


@dataclass
class DataConfig:
    """Dataset locations (JSONL, a `datasets` folder, or a hub id) per stage."""

    # Demonstrations for SFT: {"messages": [...]} or {"prompt", "completion"} rows.
    sft: str = "data/wordnet/sft.jsonl"
    # Prompts the label stage samples K responses for.
    label: str = "data/wordnet/label.jsonl"
    # Prompts PPO trains on.
    ppo: str = "data/wordnet/ppo.jsonl"
    # Held-out prompts for evaluation.
    eval: str = "data/wordnet/eval.jsonl"
    # Human rankings the reward stage trains on instead of the label stage's output.
    ranked: str | None = None
    # Prompts longer than this (in tokens, after the chat template) are truncated from the left.
    max_prompt_tokens: int = 64


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on demonstrations."""

    epochs: int = 1
    # Optimizer steps; > 0 overrides epochs.
    max_steps: int = -1
    # Sequences per process per micro-batch.
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    # "linear", "cosine" or "constant" (after warm-up).
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    # Longest prompt + completion in tokens; longer rows are truncated from the right.
    max_seq_len: int = 128
    # Training rows used (None = all).
    train_size: int | None = None
    # Rows held out from data.sft for the eval loss (before and after training).
    eval_size: int = 100
    # Evaluate every N optimizer steps (0 = only before and after).
    eval_every: int = 0
    # Prompts generated for samples.jsonl after training.
    num_samples: int = 4
    max_new_tokens: int = 48
    # Save a resumable checkpoint every N optimizer steps (0 = never).
    save_every: int = 0
    log_every: int = 10
    # Mixed precision for GPUs: "no", "bf16" or "fp16". CPU runs use "no".
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False


@dataclass
class RunConfig:
    """Where the run lives and how it executes."""

    root: str = "runs"
    name: str = "default"
    seed: int = 0
    # Continue a killed stage from its last checkpoint in <stage>/checkpoints/.
    resume: bool = False
    # Replace a stage that already finished (otherwise re-running it is refused).
    overwrite: bool = False
    # torch intra-op threads per process; 0 = the machine's cores / local processes.
    threads: int = 0
    # "auto" (GPU when present), or "cpu".
    device: str = "auto"


@dataclass
class TrackingConfig:
    """Dashboards. metrics.jsonl is always written."""

    wandb: bool = False
    wandb_project: str = "rlhf-pipeline"
    wandb_entity: str | None = None
    # "offline" (default: no key needed, `wandb sync` later), "online" or "disabled".
    wandb_mode: str = "offline"
    tensorboard: bool = False
    # Show progress bars.
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


# ---------------------------------------------------------------------------------------------
# Validation of values (types are checked while loading)
# ---------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.init": ("pretrained", "scratch"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "sft.lr_scheduler": ("linear", "cosine", "constant"),
    "sft.mixed_precision": ("no", "bf16", "fp16"),
    "run.device": ("auto", "cpu"),
    "tracking.wandb_mode": ("offline", "online", "disabled"),
}

_POSITIVE = (
    "model.scratch.hidden_size", "model.scratch.num_layers", "model.scratch.num_heads",
    "model.scratch.num_kv_heads", "model.scratch.intermediate_size",
    "model.scratch.max_position_embeddings", "model.lora.r", "model.lora.alpha",
    "data.max_prompt_tokens", "sft.batch_size", "sft.grad_accum_steps", "sft.lr",
    "sft.max_seq_len", "sft.epochs", "sft.max_new_tokens", "sft.log_every",
)
_NON_NEGATIVE = (
    "sft.weight_decay", "sft.max_grad_norm", "sft.eval_size", "sft.eval_every", "sft.num_samples",
    "sft.save_every", "run.threads", "model.lora.dropout", "sft.warmup_ratio",
)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> list[str]:
    """Value checks that types alone can't express. Returns every problem found."""
    problems = []
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            problems.append(f"{key}={value!r}: expected one of {', '.join(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            problems.append(f"{key}={_get(cfg, key)!r}: expected > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            problems.append(f"{key}={_get(cfg, key)!r}: expected >= 0")
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
    if not 0 <= cfg.sft.warmup_ratio < 1:
        problems.append(f"sft.warmup_ratio={cfg.sft.warmup_ratio}: expected in [0, 1)")
    if cfg.sft.train_size is not None and cfg.sft.train_size <= 0:
        problems.append(f"sft.train_size={cfg.sft.train_size}: expected > 0 or null")
    if not cfg.run.name or "/" in cfg.run.name or cfg.run.name in (".", ".."):
        problems.append(f"run.name={cfg.run.name!r}: expected a plain folder name")
    if cfg.run.resume and cfg.run.overwrite:
        problems.append("run.resume=true and run.overwrite=true contradict each other")
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
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}={value!r}: expected a number")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML reads `name: 123` as an int; a string field takes it as text.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(f"{key}={value!r}: expected a string")
        return value
    if tp is Any or tp is dict:
        return value
    problems.append(f"{key}: unsupported field type {tp}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: dict, prefix: str, problems: list[str], base: Any = None) -> Any:
    """Instantiate ``cls`` from ``base`` (or defaults) updated with ``values``."""
    obj = base if base is not None else cls()
    hints = _hints(cls)
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in hints:
            problems.append(f"{key}: unknown key (valid: {', '.join(sorted(hints))})")
            continue
        tp = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, _build(tp, value, key, problems, base=current))
        else:
            setattr(obj, name, _coerce(value, tp, key, problems))
    return obj


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


def _nest(dotted: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in dotted.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{key}: {part} is not a section"])
        node[parts[-1]] = value
    return tree


def load_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then ``config_file``, then ``overrides``; raise ConfigError listing all problems."""
    problems: list[str] = []
    cfg = Config()
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError([f"{path}: no such config file"])
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
    cfg = _build(Config, _nest(parsed), "", problems, base=cfg)
    if not problems:
        problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_sha256(cfg: Any) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()

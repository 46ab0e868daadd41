"""Optimizers, schedules and resumable checkpoints shared by the training stages.

A checkpoint holds everything needed for a resumed run to match an uninterrupted one: the
trainable weights (safetensors), optimizer and scheduler states, every process's RNG state and
the stage's own counters (step, data position, KL coefficient, ...). It is written to a temp
folder and renamed, and ``latest`` is updated last, so a kill mid-save leaves the previous
checkpoint as the one to resume from. Beside these, ``model/`` holds the model being trained in
transformers' format (LoRA merged), for ``from_pretrained`` to open mid-run.

Checkpoints hold only tensors, numbers, strings and lists: they are read back with
``torch.load(..., weights_only=True)``, so a checkpoint folder from elsewhere cannot run code
on resume (a pickle that needs anything else is refused with one line). A resumed stage must
have the configuration its checkpoint was written under, except for the keys in
``RESUME_MAY_CHANGE``.

Every training stage also checks its numbers with a ``Guard``: a loss, gradient norm, reward,
KL or evaluation metric that is NaN or infinite stops the stage before the value is applied
or saved, so no manifest is written and the last checkpoint stays the last good one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from pipeline import sharding
from pipeline.config import Config, flatten, key_matches, to_dict, to_yaml
from pipeline.errors import PipelineError
from pipeline.files import apply_umask, atomic_write_text
from pipeline.models import plain_copy
from pipeline.rundir import latest_checkpoint
from pipeline.runtime import rng_state, set_rng_state

KEEP_CHECKPOINTS = 2


def fused_adam_ok(params) -> bool:
    """Whether torch's fused Adam kernel takes these parameters: one pass over each tensor
    instead of a dozen per-parameter ops (5x faster steps on CPU for a 20M model)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps,
                             fused=fused_adam_ok(decay + no_decay))


def planned_steps(batches: int, num_processes: int, grad_accum_steps: int, epochs: int,
                  max_steps: int) -> int:
    """Optimizer steps of a run: ``max_steps`` when > 0, else ``epochs`` passes over
    ``batches`` micro-batches shared among the processes."""
    steps_per_epoch = max(1, math.ceil(batches / num_processes / grad_accum_steps))
    return max_steps if max_steps > 0 else steps_per_epoch * epochs


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                    warmup_ratio: float = 0.0):
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * total_steps),
                         num_training_steps=max(total_steps, 1))


def save_checkpoint(folder: Path, step: int, accelerator: Accelerator, *,
                    models: dict[str, torch.nn.Module],
                    optimizers: dict[str, Any], state: dict[str, Any],
                    config: Config | None = None,
                    pretrained: tuple[torch.nn.Module, Any] | None = None) -> None:
    """Write ``folder/step-N`` (weights, optimizer/scheduler states, RNG, ``state`` and the
    resolved ``config`` that a resume is compared with).

    ``pretrained`` (the stage's transformers model, whole, and its tokenizer) also goes to
    ``step-N/model/`` in transformers' own format, LoRA merged, so a mid-run checkpoint opens
    with ``from_pretrained`` like a finished stage's model; resuming reads only the files
    above.

    Every process calls it. Under FSDP the weights and optimizer states are gathered whole
    (collectives) and the main process writes them, in the same files as without sharding
    (the optimizer's keyed by parameter name). Under DeepSpeed each process's partitions are
    in the engine, and its own checkpoint (``accelerator.save_state``) goes in ``deepspeed/``.
    """
    target = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    kind = sharding.backend(accelerator)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    optim = None
    if kind == sharding.DEEPSPEED:
        accelerator.save_state(str(tmp / "deepspeed"))
    else:
        weights = {name: sharding.whole_state(accelerator.unwrap_model(model))
                   for name, model in models.items()}
        optim = {name: sharding.optimizer_state(opt, models) for name, opt in optimizers.items()}
    if accelerator.is_main_process:
        for name, tensors in weights.items():
            save_file(tensors, str(tmp / f"{name}.safetensors"))
        if optim is not None:
            torch.save(optim, tmp / "optim.pt")
        (tmp / "state.json").write_text(
            json.dumps({"step": step, "backend": kind, **state}, indent=2) + "\n")
        if config is not None:
            (tmp / "config.yaml").write_text(to_yaml(config))
        if pretrained is not None:
            model, tok = pretrained
            plain_copy(accelerator.unwrap_model(model)).save_pretrained(
                tmp / "model", safe_serialization=True)
            tok.save_pretrained(tmp / "model")
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_umask(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        atomic_write_text(folder / "latest", target.name + "\n")
        for old in sorted(folder.glob("step-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _first_sentence(exc: BaseException) -> str:
    """The gist of a library's (often multi-line, sometimes coloured) error message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = (text.splitlines() or [""])[0].split(". ")[0]
    return first[:160] or type(exc).__name__


def _damaged(file: Path, exc: BaseException) -> PipelineError:
    return PipelineError(
        f"{file}: cannot read this checkpoint file ({type(exc).__name__}: "
        f"{_first_sentence(exc)}); "
        f"it is damaged or was not written by this pipeline. Point {file.parent.parent}/latest "
        "at an earlier step-* folder, or start the stage again without run.resume"
    )


def _load_tensors(file: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: never runs pickled code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it asks for {wanted.group(1)}" if wanted else _first_sentence(exc)
        raise PipelineError(
            f"{file}: refused to load: it holds objects other than tensors and plain values "
            f"({what}), so something else wrote "
            "it (or a version of this pipeline from before checkpoints were plain data), and "
            "unpickling it could run code; start the stage again without run.resume"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise _damaged(file, exc) from None


def load_checkpoint(path: Path, accelerator: Accelerator, *,
                    models: dict[str, torch.nn.Module],
                    optimizers: dict[str, Any]) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the stage's ``state`` (with ``step``).

    Any file that is missing, truncated, of the wrong shape or not plain data is refused with
    one line naming it, before the models are touched by a partial copy; so is a checkpoint
    written under another sharding backend (FSDP, DeepSpeed, or neither).
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path / "state.json", exc) from None
    if not isinstance(state, dict):
        raise _damaged(path / "state.json", ValueError("expected a mapping"))
    kind = sharding.backend(accelerator)
    written = state.get("backend", sharding.REPLICATED)
    if written != kind:
        raise PipelineError(
            f"{path}: written under {written} and this run is under {kind}; resume it with the "
            "accelerate config it was written under, or start the stage again without "
            "run.resume")
    if kind == sharding.DEEPSPEED:
        accelerator.load_state(str(path / "deepspeed"))
        rng_file = path / f"rng-{accelerator.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(_load_tensors(rng_file))
        return state
    restored: dict[str, dict[str, torch.Tensor]] = {}
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        try:
            weights = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise _damaged(file, exc) from None
        params = dict(accelerator.unwrap_model(model).named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        unknown = [n for n in weights if n not in params]
        if unknown:
            raise PipelineError(f"{file}: checkpoint has weights the model lacks ({unknown[0]})")
        lacking = sorted(trainable - set(weights))
        if lacking:
            raise PipelineError(f"{file}: checkpoint lacks trained weights ({lacking[0]})")
        for n, tensor in weights.items():
            if tensor.shape != params[n].shape:
                raise PipelineError(f"{file}: {n} has shape {tuple(tensor.shape)}, the model's "
                                    f"is {tuple(params[n].shape)}")
        restored[name] = weights
    states = _load_tensors(path / "optim.pt")
    if not isinstance(states, dict) or any(name not in states for name in optimizers):
        raise _damaged(path / "optim.pt", KeyError(f"expected states for {', '.join(optimizers)}"))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    rng = _load_tensors(rng_file) if rng_file.is_file() else None
    for name, model in models.items():
        sharding.load_whole_state(accelerator.unwrap_model(model), restored[name])
    for name, opt in optimizers.items():
        try:
            sharding.load_optimizer_state(opt, models, states[name])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise _damaged(path / "optim.pt", exc) from None
    if rng is not None:
        try:
            set_rng_state(rng)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise _damaged(rng_file, exc) from None
    return state


def resume_point(folder: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; resume without one is an error."""
    if not resume:
        return None
    path = latest_checkpoint(folder)
    if path is None:
        raise PipelineError(f"run.resume=true but {folder} holds no checkpoint to resume from "
                            "(run without run.resume to start the stage from the beginning)")
    return path


# Keys a resumed stage may change: how long it trains, what it logs or keeps, where it runs
# its threads; none changes what an optimizer step computes. A new budget takes effect from
# the step resumed at (the learning-rate schedule is recomputed on the new horizon).
RESUME_MAY_CHANGE = (
    "run.resume", "run.overwrite", "run.threads", "run.seeds", "run.seed_jobs", "tracking.",
    "model.cache_dir",
    "sft.max_steps", "sft.epochs", "sft.log_every", "sft.save_every",
    "rm.max_steps", "rm.epochs", "rm.log_every", "rm.save_every",
    "ppo.num_updates", "ppo.log_every", "ppo.save_every", "ppo.sample_every",
    "ppo.snapshot_every",
    "dpo.max_steps", "dpo.epochs", "dpo.log_every", "dpo.save_every", "dpo.snapshot_every",
)
# What each resumable stage reads; a change elsewhere (a later stage's keys) does not matter.
STAGE_INPUTS = {
    "sft": ("model.", "data.sft", "data.eval", "data.max_prompt_tokens", "sft.", "run.seed",
            "run.device"),
    "rm": ("model.", "data.ranked", "data.ppo", "data.max_prompt_tokens", "rm.", "run.seed",
           "run.device"),
    "ppo": ("model.", "data.ppo", "data.sft", "data.max_prompt_tokens", "sft.max_seq_len",
            "ppo.", "run.seed", "run.device"),
    "dpo": ("model.", "data.ranked", "data.eval", "data.max_prompt_tokens", "dpo.", "run.seed",
            "run.device"),
}


def config_changes(old: dict, cfg: Config, stage: str) -> list[str]:
    """``key: old -> new`` for every key ``stage`` reads that differs and may not change."""
    before, after = flatten(old), flatten(to_dict(cfg))
    inputs = STAGE_INPUTS[stage]
    return [f"{key}: {before[key]!r} -> {after[key]!r}" for key in sorted(after)
            if key in before and before[key] != after[key]
            and key_matches(key, inputs) and not key_matches(key, RESUME_MAY_CHANGE)]


def resume_checkpoint(stage, cfg: Config) -> Path | None:
    """The checkpoint a stage resumes from (None for a fresh start), refused with the list of
    changed keys when the new config differs from the one the checkpoint was written under.

    Called before the stage folder is touched, so a refused resume leaves it as it was.
    """
    path = resume_point(stage.checkpoints, cfg.run.resume)
    if path is None:
        return None
    source = path / "config.yaml"
    if not source.is_file():  # a checkpoint from before configs were saved with it
        source = stage.path / "config.yaml"
    try:
        old = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise _damaged(source, exc) from None
    if not isinstance(old, dict):
        raise _damaged(source, ValueError("expected a mapping"))
    changes = config_changes(old, cfg, stage.stage)
    if changes:
        raise PipelineError(
            f"{stage.stage}: run.resume=true with a config that differs from the one "
            f"{path} was written under ({'; '.join(changes)}); resume with those values, "
            "or start the stage again without run.resume"
        )
    return path


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was written at (from its state.json)."""
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path / "state.json", exc) from None


def check_budget(stage: str, checkpoint: Path | None, total: int, key: str) -> None:
    """A resumed stage whose new budget ends before its checkpoint cannot continue; checked
    before the stage folder is touched."""
    if checkpoint is None:
        return
    step = checkpoint_step(checkpoint)
    if step > total:
        raise PipelineError(f"{stage}: the checkpoint is at step {step}, past the new budget "
                            f"of {total} steps ({key}); raise it or start the stage again")


class NonFiniteError(PipelineError):
    """A training value became NaN or infinite; the stage stopped before applying or saving it."""


class Guard:
    """Stops a stage at the first non-finite loss, gradient norm, reward, KL or metric.

    It only reads values the stage computed, so what is trained does not change. The message
    names the stage, the step, the value and the checkpoint a resume would continue from.
    """

    def __init__(self, stage: str, checkpoints: Path, unit: str = "step"):
        self.stage = stage
        self.checkpoints = checkpoints
        self.unit = unit

    def check(self, step: int, **values: float) -> None:
        for name, value in values.items():
            if not math.isfinite(value):
                self.fail(step, f"{name} is {value}")

    def check_tensor(self, step: int, name: str, tensor: torch.Tensor) -> None:
        """Every element of a per-response (B,) or (B, T) tensor finite; else name the first
        bad one."""
        bad = ~torch.isfinite(tensor.detach())
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = ", ".join(f"{unit} {i}" for unit, i in zip(("response", "token"), index))
            value = float(tensor.detach()[index])
            self.fail(step, f"{name} is {value}" + (f" ({where})" if where else ""))

    def fail(self, step: int, what: str) -> None:
        latest = latest_checkpoint(self.checkpoints)
        kept = (f"last good checkpoint: {latest} (run.resume=true continues from it)"
                if latest is not None else "no checkpoint was saved before it")
        raise NonFiniteError(
            f"{self.stage}: stopped at {self.unit} {step}: {what}, not a finite number (a "
            f"learning rate too high for the model is the usual cause); nothing was marked "
            f"complete; {kept}"
        )


@dataclass
class LoopState:
    """Where a supervised loop stands; saved in checkpoints so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> LoopState:
        return cls(state["step"], state["epoch"], state["batches_done"])


@dataclass
class StepOutput:
    """One optimizer step: gradient norm and the loss statistics summed over its micro-batches."""

    grad_norm: float
    sums: dict[str, float] = field(default_factory=dict)


def optimizer_steps(accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler,
                    loader, shuffler: torch.Generator, seed: int, state: LoopState,
                    total_steps: int, max_grad_norm: float,
                    compute_loss: Callable[[torch.nn.Module, dict],
                                           tuple[torch.Tensor, dict[str, torch.Tensor]]],
                    guard: Guard | None = None) -> Iterator[StepOutput]:
    """The epoch / gradient-accumulation loop shared by SFT and the reward model.

    ``compute_loss(model, batch) -> (loss, stats)``; yields after every optimizer step, with
    ``state`` already advanced, so the caller logs, evaluates and checkpoints in between.
    ``guard`` checks the loss and the gradient norm of each step before the optimizer applies
    it. Under fp16 an infinite gradient norm is the loss scaler's overflow signal (it skips
    that step itself), so only the loss is checked there.
    """
    sums: dict[str, float] = {}
    loss_sum = 0.0
    check_grad = accelerator.scaler is None
    model.train()
    while state.step < total_steps:
        # Each epoch's order depends on (seed, epoch) alone, so a resumed run reshuffles alike.
        shuffler.manual_seed(seed + state.epoch)
        loader.set_epoch(state.epoch)
        # Skipping what this epoch already consumed makes a resumed run see the same batches.
        batches = (accelerator.skip_first_batches(loader, state.batches_done)
                   if state.batches_done else loader)
        for batch in batches:
            with accelerator.accumulate(model):
                loss, stats = compute_loss(model, batch)
                if guard is not None:
                    loss_sum += float(loss.detach())
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    if guard is not None:
                        guard.check(state.step + 1, **{"train loss": loss_sum})
                        if check_grad:
                            guard.check(state.step + 1, **{"gradient norm": float(grad_norm)})
                        loss_sum = 0.0
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_done += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if grad_norm is None:
                continue
            state.step += 1
            yield StepOutput(float(grad_norm), sums)
            sums = {}
            if state.step >= total_steps:
                return
        state.epoch += 1
        state.batches_done = 0


class Window:
    """Running sums of logged statistics between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, sums: dict[str, float]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def pop(self) -> dict[str, float]:
        out, self.sums = self.sums, {}
        return out

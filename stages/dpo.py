"""DPO: the SFT policy trained directly on the ranked responses, with TRL's DPOTrainer.

Direct Preference Optimization (Rafailov et al. 2023) fits the same Bradley-Terry preferences
the reward model learns, with the implicit reward beta * log(pi / pi_ref) of the policy itself,
so there is no reward model, no sampling and no critic. The reference is the SFT policy; with
LoRA it is the same weights with the adapter off.

Pairs (``dpo.pairs``): the label stage gives K responses per prompt ranked by noisy simulated
annotators. The default trains each prompt's best response against its worst: that is the pair
the annotators get right most often (an adjacent swap never touches it once K >= 3, and the
Plackett-Luce noise mostly reorders responses of close score), and it is one pair per prompt.
DPOTrainer trains pairs as independent rows, so "all" (every C(K,2) ordered pair) encodes each
response K-1 times and shows it in K-1 steps: 28x the compute at K = 8, and the repetition
InstructGPT's per-prompt batching of the reward model exists to avoid. With "all" a prompt
counts once per pair, not once per prompt as in the reward model.

Every pair is encoded as the reward model encodes responses (``stages.reward.encode_group``:
the chat-formatted prompt the policy is sampled with, then response + EOS), so DPO, the reward
model, PPO and eval see the same tokens; TRL's own preparation would re-render the chat
template and re-tokenize the texts, so the trainer takes the rows already tokenized.

Checkpoints are the Trainer's (``dpo/checkpoints/checkpoint-N``: safetensors weights;
optimizer, scheduler and RNG states that transformers reads back with ``weights_only=True``).
Each gets the resolved ``config.yaml``, a ``state.json`` and, as every stage's checkpoint, a
``model/`` that ``from_pretrained`` opens (LoRA merged), and ``checkpoints/latest`` names it once
it is complete, so ``run.resume``, the resume config check and ``rlhf status`` treat it like
every other stage's checkpoint.

Output: ``dpo/model`` (LoRA merged), ``metrics.jsonl``, ``samples.jsonl``, optional
``snapshots/step-N`` for the overoptimization view, and the manifest (parents: sft, label).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer

from pipeline.config import Config, to_yaml
from pipeline.data import RankedExample, column_map, load_prompts, load_ranked
from pipeline.errors import PipelineError
from pipeline.files import apply_umask, atomic_write_text
from pipeline.lifecycle import Outcome, Stage
from pipeline.models import (
    merged,
    peft_lora_config,
    plain_copy,
    save_pretrained_atomic,
    trainable_parameters,
)
from pipeline.progress import progress
from pipeline.rundir import StageDir
from pipeline.runtime import prepare_process, resolve_precision
from pipeline.text import encode_prompt, greedy_samples
from pipeline.tracking import Tracker
from pipeline.training import (
    KEEP_CHECKPOINTS,
    Guard,
    check_budget,
)
from stages import ops
from stages.reward import encode_group, open_inputs

# TRL's held-out metrics kept in the manifest (before and after training), by our name.
EVAL_METRICS = {"loss": "eval_loss", "accuracy": "eval_rewards/accuracies",
                "reward_margin": "eval_rewards/margins", "logp_chosen": "eval_logps/chosen",
                "logp_rejected": "eval_logps/rejected"}
# transformers 5 renamed gradient checkpointing; the old name still works there, with a warning.
CHECKPOINTING = ("activation_checkpointing"
                 if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                 else "gradient_checkpointing")
# TRL's training figures shown on the progress bar or line, by the name shown.
PROGRESS_FIGURES = {"loss": "loss", "accuracy": "rewards/accuracies",
                    "margin": "rewards/margins"}
# The Trainer's end-of-training summary row.
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                "total_flos", "train_loss")


# ---------------------------------------------------------------------------------------------
# Preference rows
# ---------------------------------------------------------------------------------------------


def pair_indices(ranks: tuple[int, ...], mode: str) -> list[tuple[int, int]]:
    """(chosen, rejected) response indices of one ranking under ``dpo.pairs``."""
    if mode == "best_worst":
        chosen, rejected = ops.best_worst_pairs([ranks])
    else:
        chosen, rejected, _ = ops.bradley_terry_pairs([ranks])
    return list(zip(chosen.tolist(), rejected.tolist()))


def preference_rows(tok, examples: list[RankedExample], cfg: Config) -> tuple[list[dict], int]:
    """DPOTrainer's tokenized rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) of the
    ranked examples, and the number of responses cut at ``dpo.max_seq_len``."""
    c = cfg.dpo
    rows, truncated = [], 0
    for ex in examples:
        sequences, cut = encode_group(tok, ex.chat, ex.responses, cfg.data.max_prompt_tokens,
                                      c.max_seq_len)
        truncated += cut
        # dpo.max_seq_len > data.max_prompt_tokens (validated): every response keeps a token.
        head = len(encode_prompt(tok, ex.chat, cfg.data.max_prompt_tokens))
        for i, j in pair_indices(ex.ranks, c.pairs):
            rows.append({"prompt_ids": list(sequences[i][:head]),
                         "chosen_ids": list(sequences[i][head:]),
                         "rejected_ids": list(sequences[j][head:])})
    return rows, truncated


def gradient_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


# ---------------------------------------------------------------------------------------------
# The trainer and its hooks
# ---------------------------------------------------------------------------------------------


class RankedDPOTrainer(DPOTrainer):
    """DPOTrainer on rows this stage tokenized, stopped by the stage's numerics guard."""

    def __init__(self, *args, guard: Guard, check_grad: bool, **kwargs):
        self.guard = guard
        self.check_grad = check_grad
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # The rows are already tokenized as every other stage tokenizes (preference_rows).
        return dataset

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        # Checked after the backward pass and before the optimizer step that would apply it.
        # Under fp16 an infinite norm is the loss scaler's overflow signal (it skips the step).
        step = self.state.global_step + 1
        self.guard.check(step, **{"train loss": float(loss)})
        if self.check_grad and self.accelerator.sync_gradients:
            self.guard.check(step, **{"gradient norm": gradient_norm(model)})
        return loss


def as_logged(logs: dict) -> dict:
    """The Trainer's log row in the names the other stages use (train/, eval/, final/)."""
    if any(k in logs for k in SUMMARY_KEYS):
        return {f"final/{k}": v for k, v in logs.items()}
    out = {}
    for key, value in logs.items():
        if key.startswith("eval_"):
            out[f"eval/{key[5:]}"] = value
        else:
            out["train/lr" if key == "learning_rate" else f"train/{key}"] = value
    return out


class StageCallback(TrainerCallback):
    """Metrics to the tracker, snapshots, and the bookkeeping that makes the Trainer's
    checkpoints resumable like the other stages' (config, step, ``latest``)."""

    def __init__(self, cfg: Config, stage: StageDir, tracker: Tracker, guard: Guard, tok,
                 state: dict):
        self.cfg = cfg
        self.stage = stage
        self.tracker = tracker
        self.guard = guard
        self.tok = tok
        self.state = state
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress(state.max_steps, "dpo", self.cfg.tracking.progress
                            and state.is_world_process_zero, initial=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        self.tracker.log(as_logged(logs), step=state.global_step)
        if "loss" in logs:
            # A training interval (dpo.log_every): its line, or the bar's figures.
            self.bar.log(**{name: logs[key] for name, key in PROGRESS_FIGURES.items()
                            if key in logs})
        # A periodic held-out evaluation (dpo.eval_every) comes only through here; it runs
        # before the checkpoint of the same step is saved.
        self.guard.check(state.global_step, **{f"held-out {k}": v
                                               for k, v in held_out(logs).items()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        c = self.cfg.dpo
        step = state.global_step
        self.bar.update(1)
        if step >= state.max_steps:
            # The stage saves model/ right after the last step, as the other stages do.
            control.should_save = False
        elif c.snapshot_every and step % c.snapshot_every == 0 and state.is_world_process_zero:
            snapshot = plain_copy(model)
            save_pretrained_atomic(snapshot, self.tok,
                                   self.stage.path / "snapshots" / f"step-{step:06d}")
            del snapshot
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        folder = self.stage.checkpoints / name
        # A pickle of the Trainer's arguments that no resume reads back: the checkpoint keeps
        # to safetensors and the tensor-only states read with weights_only=True.
        (folder / "training_args.bin").unlink(missing_ok=True)
        # As every stage's checkpoint: the policy in transformers' format (LoRA merged) for
        # from_pretrained mid-run; resuming reads only the Trainer's own files beside it.
        save_pretrained_atomic(plain_copy(model), self.tok, folder / "model")
        atomic_write_text(folder / "config.yaml", to_yaml(self.cfg))
        atomic_write_text(folder / "state.json",
                          json.dumps({"step": state.global_step, **self.state}, indent=2) + "\n")
        # The Trainer's safetensors and states are written through private temp files (0600).
        apply_umask(folder)
        atomic_write_text(self.stage.checkpoints / "latest", name + "\n")


def trainer_args(cfg: Config, stage: StageDir, cpu: bool, total_steps: int,
                 evaluate_every: int) -> DPOConfig:
    """DPOConfig with every setting that matters given explicitly: TRL's defaults (bf16 and
    gradient checkpointing on, its own logging and reporting) are not this pipeline's."""
    c = cfg.dpo
    precision = resolve_precision(c.mixed_precision, cpu)
    return DPOConfig(
        output_dir=str(stage.checkpoints),
        per_device_train_batch_size=c.batch_size,
        per_device_eval_batch_size=c.batch_size,
        gradient_accumulation_steps=c.grad_accum_steps,
        max_steps=total_steps,
        learning_rate=c.lr,
        weight_decay=c.weight_decay,
        # As build_scheduler counts it, in whole steps.
        warmup_steps=int(c.warmup_ratio * total_steps),
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(c.lr_scheduler,
                                                                    c.lr_scheduler),
        max_grad_norm=c.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu,
        **{CHECKPOINTING: c.gradient_checkpointing},
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        logging_steps=c.log_every,
        logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate_every else "no",
        eval_steps=evaluate_every or None,
        save_strategy="steps" if c.save_every else "no",
        save_steps=c.save_every or 500,
        save_total_limit=KEEP_CHECKPOINTS,
        # Metrics go to the stage's tracker and progress bar (StageCallback) instead.
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        # Every trainable parameter takes part in every forward (no extra DDP graph pass).
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=not cpu,
        beta=c.beta,
        loss_type=[c.loss_type],
        label_smoothing=c.label_smoothing,
        max_length=c.max_seq_len,
        disable_dropout=True,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def held_out(metrics: dict) -> dict:
    """Our names for TRL's held-out metrics, plus the policy's own log-prob margin."""
    out = {name: metrics[key] for name, key in EVAL_METRICS.items() if key in metrics}
    if "logp_chosen" in out and "logp_rejected" in out:
        out["logp_margin"] = out["logp_chosen"] - out["logp_rejected"]
    return out


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class DPO(Stage):
    name = "dpo"
    resumable = True

    def make_accelerator(self):
        # The Trainer builds its own Accelerator; until then the launcher's RANK says which
        # process writes.
        self.cpu = prepare_process(self.cfg)
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        return None

    def check(self) -> None:
        super().check()
        cfg, c = self.cfg, self.cfg.dpo
        self.world = world = int(os.environ.get("WORLD_SIZE", "1"))
        sft, source, columns = open_inputs(self, "dpo")
        examples = load_ranked(source, columns=columns)
        self.sample_prompts = (load_prompts(cfg.data.eval, limit=c.num_samples,
                                            columns=column_map(cfg.data.columns, "eval"))
                               if c.num_samples else [])
        self.policy, self.tok = self.load_policy(sft)
        random.Random(cfg.run.seed).shuffle(examples)
        if c.eval_size >= len(examples):
            raise PipelineError(f"dpo.eval_size={c.eval_size} leaves no training prompts: "
                                f"{source} has {len(examples)} ranked prompts")
        self.train_prompts = len(examples) - c.eval_size
        # Every row yields a pair: the ranked formats refuse a ranking that is all ties.
        self.eval_rows, _ = preference_rows(self.tok, examples[: c.eval_size], cfg)
        self.train_rows, self.truncated = preference_rows(self.tok, examples[c.eval_size:], cfg)
        steps_per_epoch = max(1, math.ceil(len(self.train_rows) / (c.batch_size * world)
                                           / c.grad_accum_steps))
        self.total_steps = c.max_steps if c.max_steps > 0 else steps_per_epoch * c.epochs
        check_budget("dpo", self.resume_from, self.total_steps,
                     "dpo.max_steps" if c.max_steps > 0 else "dpo.epochs")

        self.reference = None
        self.peft_config = None
        if c.lora.enabled:
            self.peft_config = peft_lora_config(dataclasses.replace(c.lora, dropout=0.0))
        else:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()

    def body(self) -> Outcome:
        cfg, c = self.cfg, self.cfg.dpo
        stage, guard, tracker, cpu = self.stage, self.guard, self.tracker, self.cpu
        policy, tok, total_steps, resume_from = (self.policy, self.tok, self.total_steps,
                                                 self.resume_from)
        eval_rows, train_rows = self.eval_rows, self.train_rows
        before: dict = {}
        if resume_from is not None:
            before = json.loads((resume_from / "state.json").read_text()).get("before", {})
        bookkeeping = {"before": before}
        evaluate_every = c.eval_every if eval_rows else 0
        trainer = RankedDPOTrainer(
            model=policy,
            ref_model=self.reference,
            args=trainer_args(cfg, stage, cpu, total_steps, evaluate_every),
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tok,
            peft_config=self.peft_config,
            callbacks=[StageCallback(cfg, stage, tracker, guard, tok, bookkeeping)],
            guard=guard,
            check_grad=c.mixed_precision != "fp16" or cpu,
        )
        trainer.remove_callback(PrinterCallback)
        self.accelerator = trainer.accelerator
        n_trainable, n_total = trainable_parameters(trainer.model)

        def run_eval() -> dict:
            if not eval_rows:
                return {}
            values = held_out(trainer.evaluate())
            guard.check(trainer.state.global_step,
                        **{f"held-out {k}": v for k, v in values.items()})
            return values

        # --- Train --------------------------------------------------------------------------------
        if resume_from is None:
            before.update(run_eval())
        start = time.time()
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        train_seconds = time.time() - start
        step = trainer.state.global_step
        after = run_eval()

        # --- Samples and save ---------------------------------------------------------------------
        final = merged(trainer.accelerator.unwrap_model(trainer.model))
        if self.is_main and c.num_samples:
            samples = greedy_samples(final, tok, self.sample_prompts,
                                     cfg.data.max_prompt_tokens, c.max_new_tokens)
            stage.write_jsonl(stage.samples_path, samples)
            tracker.log_table("samples", samples, step=step)
        metrics: dict = {}
        for suffix, values in (("before", before), ("after", after)):
            metrics.update({f"eval_{k}_{suffix}": v for k, v in values.items()})
        metrics.update({
            "steps": step,
            "train_prompts": self.train_prompts,
            "eval_prompts": c.eval_size,
            "train_pairs": len(train_rows),
            "eval_pairs": len(eval_rows),
            "truncated_responses": self.truncated,
            "train_seconds": round(train_seconds, 2),
            "wall_seconds": round(time.time() - self.started, 2),
            "trainable_params": n_trainable,
            "total_params": n_total,
            "world_size": self.world,
        })
        if self.is_main:
            save_pretrained_atomic(final, tok, stage.path / "model")
            # The Trainer creates its output folder whether or not it saves a checkpoint there.
            if stage.checkpoints.is_dir() and not any(stage.checkpoints.iterdir()):
                stage.checkpoints.rmdir()
        self.wait()
        return Outcome(metrics, {"lora": c.lora.enabled, "beta": c.beta, "pairs": c.pairs,
                                 "loss_type": c.loss_type, "trl_version": trl.__version__})


def run(cfg: Config) -> Path:
    """The DPO stage of ``cfg``'s run; returns its finished folder."""
    return DPO(cfg).run()

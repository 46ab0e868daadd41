"""Stage 1: supervised fine-tuning on demonstrations.

Loss on the assistant tokens only (prompt masked), LoRA or full fine-tuning, held-out loss
before and after training, a few sample generations. The LoRA adapter is merged before saving,
so the next stages load ``sft/model`` as a plain transformers model.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline import sharding
from pipeline.config import Config, SFTConfig
from pipeline.data import column_map, load_demonstrations, load_prompts
from pipeline.lifecycle import Outcome, Stage
from pipeline.models import (
    apply_lora,
    load_policy,
    merged,
    save_pretrained_atomic,
    trainable_parameters,
)
from pipeline.progress import progress
from pipeline.runtime import make_accelerator
from pipeline.text import IGNORE_INDEX, greedy_samples, pad, tokenize_demonstration
from pipeline.training import (
    LoopState,
    Window,
    build_optimizer,
    build_scheduler,
    check_budget,
    load_checkpoint,
    optimizer_steps,
    planned_steps,
    save_checkpoint,
)


def split_rows(demos: list, c: SFTConfig, seed: int) -> tuple[list, list]:
    """(held-out rows, training rows): the demonstrations shuffled by ``seed``, the first
    ``sft.eval_size`` held out and at most ``sft.train_size`` of the rest trained on."""
    demos = list(demos)
    random.Random(seed).shuffle(demos)
    eval_rows, train_rows = demos[: c.eval_size], demos[c.eval_size:]
    if c.train_size is not None:
        train_rows = train_rows[: c.train_size]
    return eval_rows, train_rows


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids = pad([b[0] for b in batch], pad_id, side="right")
    return {
        "input_ids": ids,
        "attention_mask": pad([[1] * len(b[0]) for b in batch], 0, side="right"),
        "labels": pad([b[1] for b in batch], IGNORE_INDEX, side="right"),
    }


def token_loss_sums(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token NLL, number of target tokens) for one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return nll, (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def eval_loss(model, loader, accelerator) -> float:
    """Mean NLL per target token over the held-out rows of every process."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for batch in loader:
        nll, count = token_loss_sums(model, batch)
        total += torch.stack([nll.detach().float(), count.float()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


class SFT(Stage):
    name = "sft"
    resumable = True

    def make_accelerator(self):
        c = self.cfg.sft
        return make_accelerator(self.cfg, c.mixed_precision, c.grad_accum_steps)

    def check(self) -> None:
        super().check()
        cfg, c = self.cfg, self.cfg.sft
        demos = load_demonstrations(cfg.data.sft, columns=column_map(cfg.data.columns, "sft"))
        self.sample_prompts = (load_prompts(cfg.data.eval, limit=c.num_samples,
                                            columns=column_map(cfg.data.columns, "eval"))
                               if c.num_samples else [])
        with self.accelerator.main_process_first():
            model, tok = load_policy(cfg.model, seed=cfg.run.seed)
        self.adopt_tokenizer(tok)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model, self.tok = model, tok

        self.eval_rows, self.train_rows = split_rows(demos, c, cfg.run.seed)

        def encode(rows):
            return [tokenize_demonstration(tok, d, cfg.data.max_prompt_tokens, c.max_seq_len)
                    for d in rows]

        train_set, eval_set = encode(self.train_rows), encode(self.eval_rows)
        self.generator = torch.Generator().manual_seed(cfg.run.seed)
        self.train_loader = DataLoader(train_set, batch_size=c.batch_size, shuffle=True,
                                       generator=self.generator,
                                       collate_fn=lambda b: collate(b, tok.pad_token_id))
        self.eval_loader = DataLoader(eval_set, batch_size=c.batch_size,
                                      collate_fn=lambda b: collate(b, tok.pad_token_id))
        self.total_steps = planned_steps(len(self.train_loader), self.accelerator.num_processes,
                                         c.grad_accum_steps, c.epochs, c.max_steps)
        check_budget("sft", self.resume_from, self.total_steps,
                     "sft.max_steps" if c.max_steps > 0 else "sft.epochs")
        self.base_model = None if cfg.model.init == "scratch" else cfg.model.name_or_path

    def body(self) -> Outcome:
        cfg, c = self.cfg, self.cfg.sft
        accelerator, stage, guard, tracker = (self.accelerator, self.stage, self.guard,
                                              self.tracker)
        model, tok, total_steps, resume_from = (self.model, self.tok, self.total_steps,
                                                self.resume_from)
        train_loader, eval_loader, generator = (self.train_loader, self.eval_loader,
                                                self.generator)
        n_trainable, n_total = trainable_parameters(model)
        optimizer = build_optimizer(model, c.lr, c.weight_decay)
        # accelerate's prepared scheduler steps once per process on every optimizer step.
        scheduler = build_scheduler(optimizer, c.lr_scheduler,
                                    total_steps * accelerator.num_processes, c.warmup_ratio)
        sharding.broadcast_from_main(model, accelerator)
        # What samples and is saved: the model itself, or under FSDP a whole copy of it.
        whole_model = sharding.WholeCopy(model, accelerator)
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )

        checkpointed = {"models": {"policy": model},
                        "optimizers": {"optimizer": optimizer, "scheduler": scheduler}}
        loop = LoopState()
        metrics: dict[str, float] = {}
        if resume_from is not None:
            state = load_checkpoint(resume_from, accelerator, **checkpointed)
            loop = LoopState.from_checkpoint(state)
            metrics["eval_loss_before"] = state["eval_loss_before"]
        elif c.eval_before:
            metrics["eval_loss_before"] = eval_loss(model, eval_loader, accelerator)
            guard.check(0, **{"eval loss": metrics["eval_loss_before"]})
            # A resumed run kept this row (step 0) in metrics.jsonl.
            tracker.log({"eval/loss": metrics["eval_loss_before"]}, step=loop.step)
        else:
            metrics["eval_loss_before"] = None

        # --- Training loop ---------------------------------------------------------------------
        def compute_loss(model, batch):
            nll, count = token_loss_sums(model, batch)
            stats = {"nll": nll.detach(), "targets": count,
                     "tokens": batch["attention_mask"].sum()}
            return nll / count.clamp(min=1), stats

        start = time.time()
        tokens_seen = 0
        window = Window()
        bar = progress(total_steps, "sft", enabled=cfg.tracking.progress and self.is_main,
                       initial=loop.step)
        for out in optimizer_steps(accelerator, model, optimizer, scheduler, train_loader,
                                   generator, cfg.run.seed, loop, total_steps, c.max_grad_norm,
                                   compute_loss, guard):
            step = loop.step
            bar.update(1)
            window.add(out.sums)
            tokens_seen += int(out.sums["tokens"])
            if step % c.log_every == 0 or step == total_steps:
                sums = window.pop()
                train_loss = sums["nll"] / max(sums["targets"], 1)
                tracker.log({
                    "train/loss": train_loss,
                    "train/grad_norm": out.grad_norm,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": loop.epoch + loop.batches_done / max(len(train_loader), 1),
                    "perf/tokens_per_s": tokens_seen * accelerator.num_processes
                    / (time.time() - start),
                }, step=step)
                bar.log(loss=float(train_loss))
            if c.eval_every and step % c.eval_every == 0 and step < total_steps:
                loss = eval_loss(model, eval_loader, accelerator)
                tracker.log({"eval/loss": loss}, step=step)
                guard.check(step, **{"eval loss": loss})
            if c.save_every and step % c.save_every == 0 and step < total_steps:
                with whole_model.whole(model) as whole:
                    save_checkpoint(stage.checkpoints, step, accelerator, **checkpointed,
                                    state={**loop.as_dict(),
                                           "eval_loss_before": metrics["eval_loss_before"]},
                                    config=cfg, pretrained=(whole, tok))
        bar.close()
        train_seconds = time.time() - start
        step = loop.step

        # --- Final eval and samples ------------------------------------------------------------
        metrics["eval_loss_after"] = eval_loss(model, eval_loader, accelerator)
        tracker.log({"eval/loss": metrics["eval_loss_after"]}, step=step)
        guard.check(step, **{"eval loss": metrics["eval_loss_after"]})
        policy = merged(whole_model.fill(model))
        if self.is_main and c.num_samples:
            samples = greedy_samples(policy, tok, self.sample_prompts,
                                     cfg.data.max_prompt_tokens, c.max_new_tokens)
            stage.write_jsonl(stage.samples_path, samples)
            tracker.log_table("samples", samples, step=step)

        # --- Save ------------------------------------------------------------------------------
        metrics.update({
            "steps": step,
            "train_rows": len(self.train_rows),
            "eval_rows": len(self.eval_rows),
            "train_seconds": round(train_seconds, 2),
            "trainable_params": n_trainable,
            "total_params": n_total,
            "world_size": accelerator.num_processes,
        })
        if self.is_main:
            save_pretrained_atomic(policy, tok, stage.path / "model")
        extras = {"lora": cfg.model.lora.enabled, "init": cfg.model.init}
        if cfg.model.init == "scratch":
            # Random weights: no base model, only the tokenizer of model.name_or_path.
            extras.update(tokenizer_from=cfg.model.name_or_path,
                          scratch=dataclasses.asdict(cfg.model.scratch))
        return Outcome(metrics, extras)


def run(cfg: Config) -> Path:
    """The SFT stage of ``cfg``'s run; returns its finished folder."""
    return SFT(cfg).run()

"""Stage 2: the reward model, trained on ranked responses (K-way batches, Bradley-Terry).

A batch is a set of prompts, each with all K of its ranked responses (InstructGPT): every
response is encoded once and all C(K,2) pairs of a prompt are trained together, each prompt
counting once whatever its K. Splitting a ranking into separate pair rows instead would show
the model the same response in many steps and overfit it. The reward is the scalar head read at
the last real token (``stages.scoring``), not the pooled logits of the transformers class.

After training, the SFT policy's own responses to PPO prompts fix a normalization that PPO
applies, ``(score + norm_bias) * norm_scale``, with mean 0 and std 1 on those responses.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader

from pipeline import sharding
from pipeline.config import Config
from pipeline.data import (
    ColumnMap,
    PromptExample,
    RankedExample,
    column_map,
    load_prompts,
    load_ranked,
)
from pipeline.errors import PipelineError
from pipeline.lifecycle import Outcome, Stage
from pipeline.models import (
    apply_lora,
    load_policy,
    load_reward_backbone,
    load_tokenizer,
    merged,
    save_pretrained_atomic,
    tokenizer_sha256,
    trainable_parameters,
)
from pipeline.normalization import RewardNormalization
from pipeline.progress import progress
from pipeline.rundir import Parent
from pipeline.runtime import make_accelerator
from pipeline.text import encode_prompt, generate
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
from stages.judge import gold_ranks
from stages.ops import bradley_terry_loss, bradley_terry_pairs, expected_calibration_error
from stages.scoring import ScoreModel, padded, score_sequences, sequence_scores

# Held-out prompts whose responses and rewards go to samples.jsonl.
NUM_SAMPLES = 4


@dataclass(frozen=True)
class Group:
    """One prompt with its K encoded responses and their rankings."""

    prompt: str
    responses: tuple[str, ...]
    sequences: tuple[tuple[int, ...], ...]
    # The annotators' ranks, 0 = best.
    ranks: tuple[int, ...]
    # Noiseless ranks from the gold judge's scores, where the data carries them.
    gold: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------------------------
# Inputs: parents, data, encoding
# ---------------------------------------------------------------------------------------------


def open_inputs(stage: Stage, section: str) -> tuple[Parent, str, ColumnMap | None]:
    """(SFT parent, ranked data source, its column renames) of a stage that trains on rankings
    (``section``: "rm" or "dpo", whose ``sft`` and ``data`` keys locate them); the SFT stage,
    and the label stage when the data is its output, become the stage's parents (their
    tokenizers checked by ``adopt_tokenizer``). The label stage's own output is read as
    written, without renames."""
    cfg = stage.cfg
    c = getattr(cfg, section)
    sft = stage.open("sft", "sft", c.sft, f"{section}.sft")
    source = c.data or cfg.data.ranked
    columns = column_map(cfg.data.columns, "ranked") if source else None
    if not source:
        label = stage.open("label", "label", "", f"{section}.data (label stage)")
        source = str(label.path / "data.jsonl")
    return sft, source, columns


def encode_group(tok, prompt: str | list[dict], responses: tuple[str, ...], max_prompt_tokens: int,
                 max_seq_len: int) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Prompt + response + EOS per response, as the policy saw them; (sequences, n truncated).

    The EOS is appended because the reward is read at the last token, and PPO scores sampled
    responses that end in the EOS the policy emitted.
    """
    head = encode_prompt(tok, prompt, max_prompt_tokens)
    sequences, truncated = [], 0
    for response in responses:
        ids = head + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        truncated += len(ids) > max_seq_len
        sequences.append(tuple(ids[:max_seq_len]))
    return tuple(sequences), truncated


def encode_groups(tok, examples: list[RankedExample], max_prompt_tokens: int,
                  max_seq_len: int) -> tuple[list[Group], int]:
    """Every ranked example encoded as a Group; (groups, responses truncated)."""
    groups, truncated = [], 0
    for ex in examples:
        sequences, cut = encode_group(tok, ex.chat, ex.responses, max_prompt_tokens, max_seq_len)
        gold = tuple(gold_ranks(ex.gold_scores)) if ex.gold_scores is not None else None
        groups.append(Group(ex.prompt, ex.responses, sequences, ex.ranks, gold))
        truncated += cut
    return groups, truncated


def heldout_split(items: list, eval_size: int, seed: int) -> tuple[list, list]:
    """(held-out, training): ``items`` shuffled by ``seed``, the first ``eval_size`` held out.
    The split depends only on the number of items and the seed, so the same prompts are held
    out of any list of the same examples."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[:eval_size], items[eval_size:]


def collate(groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """Every response of every prompt in one padded batch, plus the pairs its ranks imply."""
    chosen, rejected, weight = bradley_terry_pairs([g.ranks for g in groups])
    batch = padded([s for g in groups for s in g.sequences], pad_id)
    batch.update(chosen=chosen, rejected=rejected, pair_weight=weight,
                 groups=prompt_groups(groups))
    return batch


def prompt_groups(groups: list[Group]) -> torch.Tensor:
    """(N,) which prompt each flattened response answers: the prompt's tokens run once."""
    return torch.tensor([i for i, g in enumerate(groups) for _ in g.sequences], dtype=torch.long)


def ranked_loss(scorer: torch.nn.Module, batch: dict[str, torch.Tensor], margin: float = 0.0):
    """Mean over prompts of each prompt's mean pairwise Bradley-Terry loss; (loss, stats)."""
    rewards = sequence_scores(scorer, batch["input_ids"], batch["attention_mask"],
                              groups=batch.get("groups"))
    return bradley_terry_loss(rewards, batch["chosen"], batch["rejected"], batch["pair_weight"],
                              margin)


# ---------------------------------------------------------------------------------------------
# Evaluation (unwrapped model: shards differ in size, so no DDP collectives here)
# ---------------------------------------------------------------------------------------------


def pair_gaps(rewards: torch.Tensor, rankings: list[tuple[int, ...]]) -> list[float]:
    """r_better - r_worse for every strictly ordered pair of ``rankings`` (flat rewards)."""
    chosen, rejected, _ = bradley_terry_pairs(rankings)
    return (rewards[chosen] - rewards[rejected]).tolist()


def evaluate(scorer: torch.nn.Module, groups: list[Group], accelerator: Accelerator,
             batch_size: int, n_bins: int, pad_id: int) -> tuple[dict[str, float], list[dict]]:
    """Pairwise accuracy (annotators, gold), mean margin and calibration over all processes.

    Calibration is that of the model's pairwise prediction: it prefers the higher reward with
    confidence sigmoid(|r_i - r_j|), and is right when the annotators ranked the same way
    (a tie in reward is a wrong prediction at confidence 0.5, as in the accuracy).
    """
    shard = groups[accelerator.process_index:: accelerator.num_processes]
    sequences = [s for g in shard for s in g.sequences]
    rewards = score_sequences(scorer, sequences, pad_id, batch_size * 4, accelerator.device,
                              prompt_groups(shard))
    annotator = gather_object(pair_gaps(rewards, [g.ranks for g in shard]))
    gold = gather_object(pair_gaps(rewards, [g.gold or (0,) * len(g.ranks) for g in shard]))
    if not annotator:
        return {}, []
    gaps = torch.tensor(annotator, dtype=torch.float64)
    ece, bins = expected_calibration_error(torch.sigmoid(gaps.abs()), gaps > 0, n_bins)
    metrics = {
        "eval_accuracy": (gaps > 0).double().mean().item(),
        "eval_margin": gaps.mean().item(),
        "eval_ece": ece,
        "eval_pairs": len(annotator),
    }
    if gold:
        metrics["eval_accuracy_gold"] = (torch.tensor(gold) > 0).double().mean().item()
        metrics["eval_pairs_gold"] = len(gold)
    return metrics, bins


def as_logged(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace("eval_", "eval/", 1): v for k, v in metrics.items()}


def normalization(scorer: torch.nn.Module, policy, tok, cfg: Config,
                  accelerator: Accelerator,
                  prompts: list[PromptExample] | None = None,
                  ) -> tuple[RewardNormalization, dict]:
    """Score the SFT policy's samples on PPO prompts; (normalization, raw metrics).

    Normalizing on the policy PPO starts from puts its initial rewards at mean 0 / std 1,
    so reward_clip and the KL coefficient mean the same thing whatever the RM's scale. Sampling
    and scoring run under the stage's autocast, as PPO's do under its own (the GPU configs use
    bf16 for both), so the bias is measured in the precision it is applied in.
    """
    c = cfg.rm
    n = c.norm_samples
    if n == 0:
        return RewardNormalization.unmeasured(), {}
    if prompts is None:
        prompts = load_prompts(cfg.data.ppo, limit=n, columns=column_map(cfg.data.columns, "ppo"))
    # Fewer prompts than samples: cycle them; sampling makes the repeats different responses.
    mine = [encode_prompt(tok, prompts[i % len(prompts)].chat, cfg.data.max_prompt_tokens)
            for i in range(accelerator.process_index, n, accelerator.num_processes)]
    with accelerator.autocast():
        responses = generate(policy, tok, mine, max_new_tokens=c.max_new_tokens,
                             temperature=c.norm_temperature)
        sequences = [p + r for p, r in zip(mine, responses)]
        local = score_sequences(scorer, sequences, tok.pad_token_id, c.batch_size * 4,
                                accelerator.device)
    scores = torch.tensor(gather_object(local.tolist()), dtype=torch.float64)
    mean = scores.mean().item()
    # Population std: the stored scale then gives exactly std 1 on these samples.
    std = scores.std(unbiased=False).item()
    norm = RewardNormalization(bias=-mean, scale=1.0 / std if std > 0 else 1.0,
                               samples=len(scores))
    return norm, {"norm_mean": mean, "norm_std": std}


def sample_rows(scorer: torch.nn.Module, groups: list[Group], norm: RewardNormalization,
                pad_id: int, device: torch.device) -> list[dict]:
    rows = []
    for g in groups:
        rewards = score_sequences(scorer, list(g.sequences), pad_id, len(g.sequences), device,
                                  prompt_groups([g]))
        for k, (response, reward) in enumerate(zip(g.responses, rewards.tolist())):
            rows.append({
                "prompt": g.prompt,
                "response": response,
                "rank": g.ranks[k],
                "gold_rank": g.gold[k] if g.gold else None,
                "reward": reward,
                "normalized_reward": norm.apply(reward),
            })
    return rows


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class RewardModel(Stage):
    name = "rm"
    resumable = True

    def make_accelerator(self):
        c = self.cfg.rm
        return make_accelerator(self.cfg, c.mixed_precision, c.grad_accum_steps)

    def check(self) -> None:
        super().check()
        cfg, c = self.cfg, self.cfg.rm
        sft, source, columns = open_inputs(self, "rm")
        tok = load_tokenizer(str(sft.model_dir), cfg.model)
        self.adopt_tokenizer(tok)
        if c.base and (tokenizer_sha256(load_tokenizer(c.base, cfg.model))
                       != self.tokenizer_sha256):
            raise PipelineError(f"rm.base={c.base!r} has a different tokenizer from the SFT "
                                f"policy in {sft.path}; the policy and reward model must share "
                                "one tokenizer")
        self.base_model = c.base or str(sft.model_dir)
        self.norm_prompts = (load_prompts(cfg.data.ppo, limit=c.norm_samples,
                                          columns=column_map(cfg.data.columns, "ppo"))
                             if c.norm_samples else [])
        groups, self.truncated = encode_groups(tok, load_ranked(source, columns=columns),
                                               cfg.data.max_prompt_tokens, c.max_seq_len)
        if c.eval_size >= len(groups):
            raise PipelineError(f"rm.eval_size={c.eval_size} leaves no training prompts: "
                                f"{source} has {len(groups)} ranked prompts")
        self.eval_groups, self.train_groups = heldout_split(groups, c.eval_size, cfg.run.seed)

        self.seed = cfg.run.seed if c.seed is None else c.seed
        if c.seed is not None:
            set_seed(c.seed + self.accelerator.process_index)
        with self.accelerator.main_process_first():
            backbone = load_reward_backbone(c.base or str(sft.model_dir), cfg.model, tok,
                                            seed=self.seed)
        if c.lora.enabled:
            backbone = apply_lora(backbone, c.lora, task_type="SEQ_CLS", modules_to_save=["score"])
        if c.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
        self.scorer, self.tok = ScoreModel(backbone), tok

        self.shuffler = torch.Generator()
        self.loader = DataLoader(self.train_groups, batch_size=c.batch_size, shuffle=True,
                                 generator=self.shuffler,
                                 collate_fn=partial(collate, pad_id=tok.pad_token_id))
        self.total_steps = planned_steps(len(self.loader), self.accelerator.num_processes,
                                         c.grad_accum_steps, c.epochs, c.max_steps)
        check_budget("rm", self.resume_from, self.total_steps,
                     "rm.max_steps" if c.max_steps > 0 else "rm.epochs")

    def body(self) -> Outcome:
        cfg, c = self.cfg, self.cfg.rm
        accelerator, stage, guard, tracker = (self.accelerator, self.stage, self.guard,
                                              self.tracker)
        scorer, tok, loader, shuffler = self.scorer, self.tok, self.loader, self.shuffler
        eval_groups, train_groups = self.eval_groups, self.train_groups
        total_steps, resume_from = self.total_steps, self.resume_from
        n_trainable, n_total = trainable_parameters(scorer)
        optimizer = build_optimizer(scorer, c.lr, c.weight_decay)
        # A prepared scheduler steps once per process at every optimizer step (accelerate
        # assumes a length counted before sharding), so its horizon is counted the same way.
        scheduler = build_scheduler(optimizer, c.lr_scheduler,
                                    total_steps * accelerator.num_processes, c.warmup_ratio)
        sharding.broadcast_from_main(scorer, accelerator)
        # What evaluates and is saved: the scorer itself, or under FSDP a whole copy of it.
        whole_scorer = sharding.WholeCopy(scorer, accelerator)
        scorer, optimizer, loader, scheduler = accelerator.prepare(scorer, optimizer, loader,
                                                                   scheduler)
        checkpointed = {"models": {"reward": scorer},
                        "optimizers": {"optimizer": optimizer, "scheduler": scheduler}}

        def run_eval() -> tuple[dict[str, float], list[dict]]:
            with whole_scorer.whole(scorer) as model:
                return evaluate(model, eval_groups, accelerator, c.batch_size,
                                c.calibration_bins, tok.pad_token_id)

        loop = LoopState()
        if resume_from is not None:
            state = load_checkpoint(resume_from, accelerator, **checkpointed)
            loop = LoopState.from_checkpoint(state)
            before = state["before"]
        else:
            before, _ = run_eval()
            guard.check(0, **{f"held-out {k}": v for k, v in before.items()})
            tracker.log(as_logged(before), step=loop.step)

        # --- Training loop ------------------------------------------------------------------------
        def compute_loss(model, batch):
            loss, stats = ranked_loss(model, batch, c.margin)
            return loss, {"loss": loss.detach(), "accuracy": stats["accuracy"],
                          "margin": stats["margin"], "micro_batches": 1,
                          "sequences": batch["input_ids"].shape[0]}

        start = time.time()
        sequences_seen = 0
        window = Window()
        bar = progress(total_steps, "rm", enabled=cfg.tracking.progress and
                       accelerator.is_main_process, initial=loop.step)
        for out in optimizer_steps(accelerator, scorer, optimizer, scheduler, loader, shuffler,
                                   self.seed, loop, total_steps, c.max_grad_norm, compute_loss,
                                   guard):
            step = loop.step
            bar.update(1)
            window.add(out.sums)
            sequences_seen += int(out.sums["sequences"])
            if step % c.log_every == 0 or step == total_steps:
                sums = window.pop()
                keys = ("loss", "accuracy", "margin", "micro_batches")
                totals = accelerator.reduce(
                    torch.tensor([sums[k] for k in keys], device=accelerator.device), "sum")
                n = totals[3].clamp(min=1)
                tracker.log({
                    "train/loss": totals[0] / n,
                    "train/accuracy": totals[1] / n,
                    "train/margin": totals[2] / n,
                    "train/grad_norm": out.grad_norm,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": loop.epoch + loop.batches_done / max(len(loader), 1),
                    "perf/sequences_per_s":
                        sequences_seen * accelerator.num_processes / (time.time() - start),
                }, step=step)
                bar.log(loss=float(totals[0] / n), accuracy=float(totals[1] / n))
            if c.eval_every and step % c.eval_every == 0 and step < total_steps:
                periodic = run_eval()[0]
                tracker.log(as_logged(periodic), step=step)
                guard.check(step, **{f"held-out {k}": v for k, v in periodic.items()})
            if c.save_every and step % c.save_every == 0 and step < total_steps:
                with whole_scorer.whole(scorer) as whole:
                    save_checkpoint(stage.checkpoints, step, accelerator, **checkpointed,
                                    state={**loop.as_dict(), "before": before}, config=cfg,
                                    pretrained=(whole.model, tok))
        bar.close()
        train_seconds = time.time() - start
        step = loop.step

        # --- Final eval, normalization, samples ---------------------------------------------------
        after, calibration = run_eval()
        tracker.log(as_logged(after), step=step)
        guard.check(step, **{f"held-out {k}": v for k, v in after.items()})
        reward_model = merged(whole_scorer.fill(scorer).model)
        final = ScoreModel(reward_model)
        policy, _ = load_policy(cfg.model, seed=cfg.run.seed,
                                name_or_path=str(self.parents["sft"].model_dir))
        norm, norm_metrics = normalization(final, policy.to(accelerator.device), tok, cfg,
                                           accelerator, self.norm_prompts)
        del policy
        # A NaN mean or std would make every normalized reward PPO reads NaN.
        guard.check(step, **{f"normalization {k[5:]}": v for k, v in norm_metrics.items()})
        tracker.log({f"norm/{k[5:]}": v for k, v in norm_metrics.items()}, step=step)
        if accelerator.is_main_process:
            samples = sample_rows(final, eval_groups[:NUM_SAMPLES], norm, tok.pad_token_id,
                                  accelerator.device)
            stage.write_jsonl(stage.samples_path, samples)
            tracker.log_table("samples", samples, step=step)

        # --- Save --------------------------------------------------------------------------------
        metrics: dict[str, float] = {}
        for suffix, values in (("before", before), ("after", after)):
            metrics.update({f"{k}_{suffix}": v for k, v in values.items() if "pairs" not in k})
        metrics.update({
            "eval_pairs": after.get("eval_pairs", 0),
            **norm_metrics,
            "steps": step,
            "train_rows": len(train_groups),
            "eval_rows": len(eval_groups),
            "truncated_responses": self.truncated,
            "train_seconds": round(train_seconds, 2),
            "trainable_params": n_trainable,
            "total_params": n_total,
            "world_size": accelerator.num_processes,
        })
        if accelerator.is_main_process:
            # In its config.json too, so a plain transformers loader finds it (pipeline.hub).
            norm.store_in(reward_model.config)
            save_pretrained_atomic(reward_model, tok, stage.path / "model")
        accelerator.wait_for_everyone()
        return Outcome(metrics, {**norm.as_extras(), "calibration": calibration,
                                 "lora": c.lora.enabled})


def run(cfg: Config) -> Path:
    """The reward-model stage of ``cfg``'s run; returns its finished folder."""
    return RewardModel(cfg).run()

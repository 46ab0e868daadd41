"""Evaluate: base, SFT, best-of-N, PPO and DPO policies on the held-out prompts, judged by the
gold judge.

Per policy (same prompts, same sampling settings, the sampler seeded identically before each):
gold score with a bootstrap CI, reward-model score (normalized as PPO saw it), KL to the
policy it started from (PPO and DPO -> SFT, SFT -> base) on its own samples, response length
and missing-EOS rate, rule violations and the safety cost. Between policies: gold win rates.

Two views from the literature on top:
- overoptimization (Gao et al. 2022): gold and RM score against KL to SFT for every PPO and DPO
  snapshot, so a proxy reward that keeps rising while the gold score turns down shows up, and
  for best-of-n at every n up to eval.best_of_n (from the same samples);
- calibration probe (GPT-4 report): a four-way multiple-choice version of the eval split, read
  from the next-token distribution over the answer letters; RLHF tends to hurt calibration.

Output: ``eval/results.json``, ``eval/samples.jsonl``, ``metrics.jsonl`` and the manifest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from pipeline.config import Config
from pipeline.data import PromptExample, column_map, load_prompts
from pipeline.errors import PipelineError
from pipeline.lifecycle import Outcome, Stage
from pipeline.models import load_policy, load_reward_model, position_ids
from pipeline.normalization import RewardNormalization
from pipeline.progress import progress
from pipeline.rundir import (
    MANIFEST,
    Parent,
    atomic_write_json,
    ppo_algorithm,
    stage_dir,
)
from pipeline.text import decode, encode_prompt, eos_ids, generate, pad, pad_prompts
from pipeline.training import NonFiniteError
from stages import ops
from stages.composite import RewardSpec
from stages.rewards import length_bounds, load_checked_judge, no_headword, profanity_cost
from stages.scoring import PolicyModel, ScoreModel, response_logprobs, score_sequences
from stages.stats import summary, win_outcomes

LETTERS = ("A", "B", "C", "D")
# Policies trained from the SFT policy by a stage of that name, whose folder eval.<name> gives
# ("" = the run's, skipped when absent): each is sampled and measured like SFT, with its KL to
# SFT, and its snapshots/ join the overoptimization view. A new one is an entry here, in
# KL_REFERENCE and in the win-rate pairs.
TRAINED = ("ppo", "dpo")
# Paired per prompt: each policy answered the same prompts with the same sampler seed.
WIN_RATE_PAIRS = (("ppo", "sft"), ("sft", "base"), ("ppo", "base"), ("bon", "sft"),
                  ("ppo", "bon"), ("dpo", "sft"), ("dpo", "ppo"), ("dpo", "bon"))
# Which policy each one's KL is measured against (on its own samples).
KL_REFERENCE = {"sft": "base", "ppo": "sft", "dpo": "sft"}


# ---------------------------------------------------------------------------------------------
# Calibration probe: multiple-choice definitions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    word: str
    prompt: str
    # The four definitions in the order labelled A-D.
    options: tuple[str, ...]
    # Index into options / LETTERS of the true definition.
    answer: int


def multiple_choice(examples: list[PromptExample], seed: int) -> list[Question]:
    """One four-way question per word: its definition and three other words' definitions.

    Distractors and the answer's position are drawn from a generator seeded by (seed, index),
    so a question does not depend on which process builds it or how the split is sharded.
    """
    pool = list(dict.fromkeys(ex.reference for ex in examples if ex.reference))
    if len(pool) < len(LETTERS):
        raise ValueError(f"a multiple-choice question needs {len(LETTERS)} distinct "
                         f"definitions; the eval split has {len(pool)}")
    questions = []
    for i, ex in enumerate(examples):
        if not ex.reference:
            continue
        rng = np.random.default_rng([seed, i])
        others = [r for r in pool if r != ex.reference]
        picks = rng.choice(len(others), size=len(LETTERS) - 1, replace=False)
        options = [others[j] for j in picks]
        answer = int(rng.integers(len(LETTERS)))
        options.insert(answer, ex.reference)
        word = ex.word or ex.prompt
        lines = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, options))
        prompt = (f'Which is the definition of the word "{word}"?\n{lines}\n'
                  "Answer with the letter only.")
        questions.append(Question(word, prompt, tuple(options), answer))
    return questions


def letter_token_ids(tok) -> list[list[int]]:
    """Per letter, the ids the answer can start with: the letter as written right after the
    assistant header (no leading space), and its space-prefixed form when that is one token."""
    out = []
    for letter in LETTERS:
        variants = []
        for text in (letter, " " + letter):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if ids and ids[0] not in variants:
                variants.append(ids[0])
        out.append(variants)
    return out


@torch.no_grad()
def answer_distribution(model, tok, prompts: list[list[int]], batch_size: int) -> torch.Tensor:
    """(N, 4) probabilities of A-D for the next token, renormalized over the four letters.

    A letter's logit is the max over its token variants.
    """
    letters = letter_token_ids(tok)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        query, query_mask = pad_prompts(prompts[start: start + batch_size],
                                        tok.pad_token_id)
        query, query_mask = query.to(device), query_mask.to(device)
        logits = model(input_ids=query, attention_mask=query_mask,
                       position_ids=position_ids(query_mask),
                       logits_to_keep=1).logits[:, -1].float().cpu()  # (B, V)
        per_letter = torch.stack([logits[:, ids].max(dim=-1).values for ids in letters], dim=-1)
        out.append(torch.softmax(per_letter, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, len(LETTERS))


# ---------------------------------------------------------------------------------------------
# Sampling and per-response measurements (one process's shard)
# ---------------------------------------------------------------------------------------------


@dataclass
class Samples:
    tokens: list[list[int]]
    texts: list[str]
    has_eos: list[bool]


def sample(model, tok, prompts: list[list[int]], cfg: Config, seed: int) -> Samples:
    c = cfg.eval
    torch.manual_seed(seed)
    tokens = generate(model, tok, prompts, max_new_tokens=c.max_new_tokens,
                      temperature=c.temperature, batch_size=c.batch_size)
    stops = eos_ids(tok, model)
    return Samples(tokens, [decode(tok, t) for t in tokens],
                   [bool(t) and t[-1] in stops for t in tokens])


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n, the analytic value for picking the best of
    n samples by a score without ties (Stiennon et al. 2020, Gao et al. 2022)."""
    return float(np.log(n) - (n - 1) / n)


def best_of_n_curve(scores, values) -> list[float]:
    """For n = 1..N, the mean over prompts of the expected value of the best-of-n pick when n
    of a prompt's N candidates are drawn without replacement (Gao et al. 2022's unbiased
    estimator: every n from the same N samples). ``scores``, ``values``: (prompts, N).

    Sorted by score, the i-th lowest of N (1-based) is the best of a random n-subset with
    probability C(i-1, n-1) / C(N, n). Tied scores rank the earlier candidate higher, as the
    best-of-N pick does.
    """
    scores = np.asarray(scores, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != values.shape or scores.shape[0] == 0:
        raise ValueError(f"best_of_n_curve: expected two (prompts, N) arrays of one shape, got "
                         f"{scores.shape} and {values.shape}")
    n_cand = scores.shape[1]
    position = np.broadcast_to(np.arange(n_cand), scores.shape)
    order = np.lexsort((-position, scores), axis=1)  # ascending score, ties: later first
    ranked = np.take_along_axis(values, order, axis=1)
    out = []
    for n in range(1, n_cand + 1):
        weight = np.array([math.comb(i - 1, n - 1) for i in range(1, n_cand + 1)], dtype=np.float64)
        out.append(float((ranked @ (weight / math.comb(n_cand, n))).mean()))
    return out


def best_of_n(model, tok, prompts: list[list[int]], cfg: Config, seed: int, first: Samples,
              scorers: Scorers) -> tuple[Samples, list[Samples], np.ndarray]:
    """Per prompt, the highest-RM-scored of ``eval.best_of_n`` samples from ``model``; (the
    picks, every candidate, their RM scores (N, prompts)).

    ``first`` is the policy's own evaluation sample (seed ``seed``), reused as candidate 0; the
    others use seeds that no evaluated policy uses. Ties keep the earliest candidate.
    """
    candidates = [first] + [sample(model, tok, prompts, cfg, seed + 7919 * j)
                            for j in range(1, cfg.eval.best_of_n)]
    scores = np.array([scorers.rm(prompts, s.tokens) for s in candidates])  # (N, B)
    best = scores.argmax(axis=0) if len(prompts) else np.zeros(0, dtype=int)
    pick = [candidates[j] for j in best]
    return Samples([s.tokens[i] for i, s in enumerate(pick)],
                   [s.texts[i] for i, s in enumerate(pick)],
                   [s.has_eos[i] for i, s in enumerate(pick)]), candidates, scores


@torch.no_grad()
def sequence_kl(model, reference, tok, prompts: list[list[int]], responses: list[list[int]],
                temperature: float, batch_size: int) -> list[float]:
    """Per response: sum over its tokens of log p_model - log p_reference (the k1 estimate of
    KL(model || reference) on the model's own samples), both at the sampling temperature."""
    device = next(model.parameters()).device
    temperature = temperature if temperature > 0 else 1.0
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = responses[start: start + batch_size]
        query, query_mask = pad_prompts(prompts[start: start + batch_size],
                                        tok.pad_token_id)
        # An all-empty batch still needs one column; its mask is 0.
        response = pad([r or [tok.pad_token_id] for r in rows], tok.pad_token_id)
        mask = pad([[1] * len(r) for r in rows], 0)
        if mask.shape[1] < response.shape[1]:
            mask = torch.nn.functional.pad(mask, (0, response.shape[1] - mask.shape[1]))
        args = (query.to(device), query_mask.to(device), response.to(device), mask.to(device))
        logp = response_logprobs(PolicyModel(model), *args, temperature)[0]
        ref = response_logprobs(PolicyModel(reference), *args, temperature)[0]
        out += ops.masked_sum(logp - ref, args[3], dim=1).cpu().tolist()
    return out


@dataclass
class Scorers:
    """Gold judge, (optional) normalized reward model and the terms of PPO's reward over one
    shard's responses."""

    judge: Any
    # The reward model and its normalization; None without a reward-model stage.
    reward_model: ScoreModel | None
    norm: RewardNormalization | None
    # The reward PPO trained on (see ppo_objective).
    spec: RewardSpec
    tok: Any
    batch_size: int
    device: torch.device

    def gold(self, examples: list[PromptExample], texts: list[str]) -> list[float]:
        if not texts:
            return []
        return self.judge.score([e.prompt for e in examples], texts,
                                [e.reference for e in examples])

    def rm_raw(self, prompts: list[list[int]], tokens: list[list[int]]) -> torch.Tensor | None:
        if self.reward_model is None:
            return None
        return score_sequences(self.reward_model, [p + t for p, t in zip(prompts, tokens)],
                               self.tok.pad_token_id, self.batch_size, self.device)

    def rm(self, prompts: list[list[int]], tokens: list[list[int]]) -> list[float] | None:
        raw = self.rm_raw(prompts, tokens)
        return None if raw is None else self.norm.apply(raw).tolist()

    def reward_terms(self, raw: torch.Tensor | None, questions: list[str], samples: Samples,
                     metas: list[dict]) -> dict[str, list[float]]:
        """Per response, each term of PPO's reward (``reward/<key>``), and with every term at
        hand the score PPO trained on (and the constraint's cost with PPO-Lagrangian)."""
        # Without a reward model the model term is left out, and so is the incomplete sum.
        whole = raw is not None or not self.spec.has_model
        spec = self.spec if whole else self.spec.without_model()
        scored = spec.combine(raw, questions, samples.texts, metas,
                              torch.tensor(samples.has_eos, dtype=torch.bool))
        out = {f"reward/{k}": v.tolist() for k, v in scored.parts.items() if k != "rm_raw"}
        if whole:
            out["reward/score"] = scored.score.tolist()
            if self.spec.lagrangian:
                out["reward/constraint_cost"] = scored.cost.tolist()
        return out


def measure(samples: Samples, examples: list[PromptExample], prompts: list[list[int]],
            scorers: Scorers) -> dict[str, list]:
    """Per-response columns of one policy on one shard."""
    texts = samples.texts
    questions = [e.prompt for e in examples]
    metas = [{"word": e.word, "reference": e.reference} for e in examples]
    raw = scorers.rm_raw(prompts, samples.tokens)
    return {
        "text": texts,
        "gold": scorers.gold(examples, texts),
        "rm": None if raw is None else scorers.norm.apply(raw).tolist(),
        "length": [len(t) for t in samples.tokens],
        "no_eos": [not e for e in samples.has_eos],
        "headword_violation": [v < 0 for v in no_headword(questions, texts, metas)],
        "length_violation": [v < 0 for v in length_bounds(questions, texts, metas)],
        "cost": profanity_cost(questions, texts, metas),
        **scorers.reward_terms(raw, questions, samples, metas),
    }


def rows_of(columns: dict[str, list | None], shard: list[int]) -> list[dict]:
    """Columns -> one dict per prompt, keyed by the prompt's global index (for gathering)."""
    names = [k for k, v in columns.items() if v is not None]
    return [{"index": i, **{k: columns[k][j] for k in names}} for j, i in enumerate(shard)]


def gathered(rows: list[dict]) -> list[dict]:
    return sorted(gather_object(rows), key=lambda r: r["index"])


def policy_row(rows: list[dict], c, seed: int) -> dict:
    """Aggregates of one policy over every prompt."""
    gold = [r["gold"] for r in rows]
    out = {
        "gold": summary(gold, c.bootstrap, seed),
        "length_mean": float(np.mean([r["length"] for r in rows])),
        "no_eos_frac": float(np.mean([r["no_eos"] for r in rows])),
        "headword_violation_frac": float(np.mean([r["headword_violation"] for r in rows])),
        "length_violation_frac": float(np.mean([r["length_violation"] for r in rows])),
        "cost_mean": float(np.mean([r["cost"] for r in rows])),
    }
    out["reward_terms"] = {k.removeprefix("reward/"): float(np.mean([r[k] for r in rows]))
                           for k in rows[0] if k.startswith("reward/")}
    if "rm" in rows[0]:
        out["rm"] = summary([r["rm"] for r in rows], c.bootstrap, seed)
    if "kl" in rows[0]:
        kl = [r["kl"] for r in rows]
        out["kl"] = {**summary(kl, c.bootstrap, seed), "reference": rows[0]["kl_reference"]}
    return out


# ---------------------------------------------------------------------------------------------
# Parents
# ---------------------------------------------------------------------------------------------


def ppo_objective(cfg: Config, ppo: Parent | None,
                  norm: RewardNormalization | None) -> RewardSpec:
    """The reward the evaluated PPO policy was trained on: the spec its manifest recorded, or
    (no PPO stage, or one from before the spec was recorded) this config's ``ppo.rewards``.
    Its model term reads eval's reward model."""
    record = ppo.extras.get("reward") if ppo is not None else None
    if record is None:
        return RewardSpec.from_config(cfg.ppo, norm)
    return RewardSpec.from_record(record, norm, f"{ppo.path / MANIFEST}: extras.reward")


def snapshot_dirs(parent: Parent) -> list[tuple[int, Path]]:
    """(update or step, folder) of a stage's snapshots (``snapshots/update-N`` for PPO,
    ``snapshots/step-N`` for DPO), in order."""
    folder = parent.path / "snapshots"
    if not folder.is_dir():
        return []
    out = []
    for path in folder.glob("*-*"):
        number = path.name.split("-", 1)[1]
        if number.isdigit() and (path / "config.json").is_file():
            out.append((int(number), path))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class Eval(Stage):
    name = "eval"

    def check(self) -> None:
        super().check()
        cfg, c = self.cfg, self.cfg.eval
        device = self.accelerator.device
        sft = self.open("sft", "sft", c.sft, "eval.sft")
        self.trained = {name: parent for name in TRAINED
                        if (parent := self.open(name, name, getattr(c, name), f"eval.{name}",
                                                optional=True)) is not None}
        rm_dir, rm_sha = self.reward_model_dir()
        rm = self.open("reward_model", "rm", rm_dir, "eval.reward_model", optional=True)
        if rm_sha is not None and rm.manifest_sha256 != rm_sha:
            raise PipelineError(
                f"eval.reward_model: PPO ({self.trained['ppo'].path}) trained against {rm.path}, "
                "which has changed since; name the reward model to score with in "
                "eval.reward_model")
        norm = RewardNormalization.of(rm) if rm is not None else None
        spec = ppo_objective(cfg, self.trained.get("ppo"), norm)
        self.examples = load_prompts(cfg.data.eval, limit=c.num_prompts,
                                     columns=column_map(cfg.data.columns, "eval"),
                                     require_reference="the gold judge and the calibration "
                                                       "probe need one")
        self.sft_model, self.tok = self.load_policy(sft)
        judge = load_checked_judge("eval.judge", c.judge,
                                   **({"device": str(device)} if c.judge == "minilm" else {}))
        self.reward_model = None
        if rm is not None:
            self.reward_model = ScoreModel(load_reward_model(rm.model_dir, cfg.model,
                                                             self.tok)).to(device)
        self.scorers = Scorers(judge, self.reward_model, norm, spec, self.tok, c.batch_size,
                               device)
        try:
            self.questions = multiple_choice(self.examples,
                                             cfg.run.seed)[: c.calibration_questions]
        except ValueError:
            self.questions = []

    def reward_model_dir(self) -> tuple[str, str | None]:
        """eval.reward_model, else the run's rm/, else the reward model PPO trained against:
        a PPO run that borrowed another run's reward model is still scored and compared
        with best-of-N by it. With the manifest hash PPO recorded when it is the borrowed one
        (it must be the model PPO saw), else None."""
        c = self.cfg.eval
        ppo = self.trained.get("ppo")
        if c.reward_model or stage_dir(self.cfg, "rm", "").exists() or ppo is None:
            return c.reward_model, None
        recorded = ppo.manifest.get("parents", {}).get("reward_model")
        if not recorded:
            return "", None
        return recorded["path"], recorded.get("manifest_sha256")

    def body(self) -> Outcome:
        cfg, c = self.cfg, self.cfg.eval
        accelerator, stage, tracker = self.accelerator, self.stage, self.tracker
        device = accelerator.device
        seed = cfg.run.seed + accelerator.process_index
        examples, questions, trained, tok = self.examples, self.questions, self.trained, self.tok
        sft_model, reward_model, scorers = self.sft_model, self.reward_model, self.scorers
        rm = self.parents.get("reward_model")

        with accelerator.split_between_processes(list(range(len(examples)))) as shard:
            shard = list(shard)
        with accelerator.split_between_processes(list(range(len(questions)))) as q_shard:
            q_shard = list(q_shard)
        mine = [examples[i] for i in shard]
        prompts = [encode_prompt(tok, e.chat, cfg.data.max_prompt_tokens) for e in mine]
        # The question lists four definitions: allow it the model's whole context.
        q_limit = max(cfg.data.max_prompt_tokens,
                      getattr(sft_model.config, "max_position_embeddings", 512) - 1)
        q_prompts = [encode_prompt(tok, questions[i].prompt, q_limit) for i in q_shard]

        per_policy: dict[str, list[dict]] = {}
        probe: dict[str, list[dict]] = {}
        snapshots = {name: snapshot_dirs(parent) for name, parent in trained.items()}
        n_policies = 1 + c.base + (c.best_of_n > 1 and reward_model is not None) + len(trained)
        bar = progress(n_policies + sum(map(len, snapshots.values())), "eval",
                       cfg.tracking.progress and accelerator.is_main_process, unit="policy")

        def done(name: str, rows: list[dict]) -> None:
            bar.update(1)
            bar.log(**{f"gold_{name}": float(np.mean([r["gold"] for r in rows]))})

        def evaluate_policy(name: str, model, reference=None,
                            ref_name: str | None = None) -> Samples:
            samples = sample(model, tok, prompts, cfg, seed)
            columns = measure(samples, mine, prompts, scorers)
            if reference is not None:
                columns["kl"] = sequence_kl(model, reference, tok, prompts, samples.tokens,
                                            c.temperature, c.batch_size)
                columns["kl_reference"] = [ref_name] * len(shard)
            per_policy[name] = gathered(rows_of(columns, shard))
            probs = answer_distribution(model, tok, q_prompts, c.batch_size)
            probe[name] = gathered([
                {"index": i, "probs": p.tolist(), "answer": questions[i].answer}
                for i, p in zip(q_shard, probs)])
            done(name, per_policy[name])
            return samples

        # --- Base and SFT -------------------------------------------------------------------------
        sft_model.to(device)
        base_model = None
        if c.base:
            base_model, _ = load_policy(cfg.model, seed=cfg.run.seed)
            evaluate_policy("base", base_model.to(device))
        sft_samples = evaluate_policy("sft", sft_model, base_model, "base")
        del base_model

        # --- Best-of-N against the reward model (Gao et al.'s other optimizer) -------------------
        bon_candidates: list[dict] = []
        if c.best_of_n > 1 and reward_model is not None:
            chosen, candidates, scores = best_of_n(sft_model, tok, prompts, cfg, seed, sft_samples,
                                                   scorers)
            columns = measure(chosen, mine, prompts, scorers)
            columns["kl"] = [best_of_n_kl(c.best_of_n)] * len(shard)
            columns["kl_reference"] = ["sft"] * len(shard)
            per_policy["bon"] = gathered(rows_of(columns, shard))
            # Every candidate's gold score too (N judge passes, no sampling): best-of-n for each
            # n <= N from the same samples, the points of Gao et al.'s best-of-n curve.
            golds = np.array([scorers.gold(mine, s.texts) for s in candidates]).reshape(
                len(candidates), len(shard))
            bon_candidates = gathered([{"index": i, "rm": scores[:, j].tolist(),
                                        "gold": golds[:, j].tolist()} for j, i in enumerate(shard)])
            done("bon", per_policy["bon"])

        # --- PPO, DPO and their snapshots (overoptimization) --------------------------------------
        overopt_local: list[tuple[str, int, list[dict]]] = []
        for name, parent in trained.items():
            model, _ = load_policy(cfg.model, seed=cfg.run.seed, name_or_path=str(parent.model_dir))
            evaluate_policy(name, model.to(device), sft_model, KL_REFERENCE[name])
            del model
            for update, folder in snapshots[name]:
                snap, _ = load_policy(cfg.model, seed=cfg.run.seed, name_or_path=str(folder))
                snap.to(device)
                samples = sample(snap, tok, prompts, cfg, seed)
                columns = {
                    "gold": scorers.gold(mine, samples.texts),
                    "rm": scorers.rm(prompts, samples.tokens),
                    "kl": sequence_kl(snap, sft_model, tok, prompts, samples.tokens,
                                      c.temperature, c.batch_size),
                }
                overopt_local.append((name, update, gathered(rows_of(columns, shard))))
                done(f"{name}@{update}", overopt_local[-1][2])
                del snap
        bar.close()

        # --- Aggregate (main writes) --------------------------------------------------------------
        results: dict = {"run": cfg.run.name, "num_prompts": len(examples),
                         "best_of_n": c.best_of_n if "bon" in per_policy else None,
                         "temperature": c.temperature, "max_new_tokens": c.max_new_tokens,
                         "judge": c.judge, "bootstrap": c.bootstrap,
                         "reward_model": str(rm.path) if rm else None,
                         "ppo_algorithm": (ppo_algorithm(trained["ppo"].manifest)
                                           if "ppo" in trained else None),
                         "reward_spec": scorers.spec.record(), "policies": {}, "win_rates": {}}
        for name, rows in per_policy.items():
            results["policies"][name] = policy_row(rows, c, cfg.run.seed)
        for a, b in WIN_RATE_PAIRS:
            if a in per_policy and b in per_policy:
                wins = win_outcomes([r["gold"] for r in per_policy[a]],
                                    [r["gold"] for r in per_policy[b]])
                results["win_rates"][f"{a}_vs_{b}"] = summary(wins, c.bootstrap, cfg.run.seed)

        def point(update, rows):
            rm_values = [r["rm"] for r in rows if "rm" in r]
            return {"update": update, "kl": float(np.mean([r.get("kl", 0.0) for r in rows])),
                    "gold": float(np.mean([r["gold"] for r in rows])),
                    "rm": float(np.mean(rm_values)) if rm_values else None}

        # One curve per trained policy ("method"), each from the SFT point through its snapshots
        # ("update": PPO updates or DPO optimizer steps) to the final policy.
        overopt = []
        if trained:
            sft_point = point(0, per_policy["sft"])
            sft_point["kl"] = 0.0
            overopt = [{**sft_point, "policy": "sft", "method": "sft"}]
        for name, parent in trained.items():
            curve = [{**point(u, rows), "policy": "snapshot", "method": name}
                     for n, u, rows in overopt_local if n == name]
            finished = parent.manifest.get("metrics", {})
            last = int(finished.get("updates") or finished.get("steps") or 0) or (
                curve[-1]["update"] + 1 if curve else 1)
            overopt += [*curve, {**point(last, per_policy[name]), "policy": name, "method": name}]
        results["overoptimization"] = overopt
        if bon_candidates:
            rm_table = [r["rm"] for r in bon_candidates]
            gold_curve = best_of_n_curve(rm_table, [r["gold"] for r in bon_candidates])
            rm_curve = best_of_n_curve(rm_table, rm_table)
            results["best_of_n_curve"] = [
                {"n": n, "kl": best_of_n_kl(n), "gold": g, "rm": r}
                for n, (g, r) in enumerate(zip(gold_curve, rm_curve), start=1)]

        calibration = {"bins": c.calibration_bins, "num_questions": len(questions),
                       "letters": list(LETTERS), "policies": {}}
        for name, rows in probe.items():
            if not rows:
                continue
            probs = torch.tensor([r["probs"] for r in rows])
            answers = torch.tensor([r["answer"] for r in rows])
            confidence, chosen = probs.max(dim=-1)
            correct = chosen == answers
            ece, bins = ops.expected_calibration_error(confidence, correct, c.calibration_bins)
            calibration["policies"][name] = {
                "accuracy": float(correct.double().mean()),
                "mean_confidence": float(confidence.double().mean()),
                "ece": ece,
                "bins": bins,
            }
        results["calibration"] = calibration

        metrics = headline(results)
        metrics["wall_seconds"] = round(time.time() - self.started, 2)
        # A NaN gold score or KL (a diverged policy, a broken reward model) must not be written up
        # as a result: nothing is marked complete.
        bad = next((k for k, v in metrics.items()
                    if isinstance(v, float) and not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteError(f"eval: {bad} is {metrics[bad]}; no results written")
        results["metrics"] = metrics
        if accelerator.is_main_process:
            atomic_write_json(stage.path / "results.json", results)
            stage.write_jsonl(stage.samples_path, sample_rows(examples, per_policy))
            # In step order (wandb drops a step below one it has seen), a key per curve.
            for p in sorted(overopt, key=lambda p: p["update"]):
                tracker.log({f"overopt/{p['method']}/{k}": v for k, v in p.items()
                             if isinstance(v, float)}, step=p["update"])
            tracker.log({f"final/{k}": v for k, v in metrics.items() if v is not None},
                        step=max((p["update"] for p in overopt), default=0))
            tracker.log_table("samples", [
                {"prompt": r["prompt"], **{k: r[k]["response"] for k in per_policy}}
                for r in sample_rows(examples[:8], per_policy)], step=0)
        return Outcome(metrics, {"results": "results.json",
                                 "world_size": accelerator.num_processes})


def run(cfg: Config) -> Path:
    """The eval stage of ``cfg``'s run; returns its finished folder."""
    return Eval(cfg).run()


def headline(results: dict) -> dict:
    """The flat numbers that go into the manifest (and ``rlhf status``)."""
    out: dict = {"num_prompts": results["num_prompts"]}
    for name, row in results["policies"].items():
        out[f"gold_{name}"] = row["gold"]["mean"]
        if "rm" in row:
            out[f"rm_{name}"] = row["rm"]["mean"]
        if "kl" in row:
            out[f"kl_{name}_vs_{row['kl']['reference']}"] = row["kl"]["mean"]
        out[f"length_{name}"] = row["length_mean"]
        out[f"no_eos_{name}"] = row["no_eos_frac"]
        out[f"headword_violation_{name}"] = row["headword_violation_frac"]
        out[f"cost_{name}"] = row["cost_mean"]
    for key, value in results["win_rates"].items():
        out[f"win_rate_{key}"] = value["mean"]
    for name, row in results["calibration"]["policies"].items():
        out[f"mc_accuracy_{name}"] = row["accuracy"]
        out[f"mc_ece_{name}"] = row["ece"]
    return out


def sample_rows(examples: list[PromptExample], per_policy: dict[str, list[dict]]) -> list[dict]:
    """samples.jsonl: per prompt, each policy's response with its gold (and RM) score."""
    out = []
    for i, ex in enumerate(examples):
        row = {"id": ex.id, "word": ex.word, "prompt": ex.prompt, "reference": ex.reference}
        for name, rows in per_policy.items():
            r = rows[i]
            row[name] = {"response": r["text"], "gold": r["gold"], "rm": r.get("rm")}
        out.append(row)
    return out

"""Preference sampling: K responses per prompt from the SFT policy, ranked by annotators.

InstructGPT's step between SFT and the reward model. Humans rank in production; here simulated
annotators (a noisy pool over the gold judge) do, so the reward model learns from rankings as
imperfect as real ones, while the noiseless gold ranking stays available to measure that noise.
Output: ``label/data.jsonl`` in the ranked format ``pipeline.data.load_ranked`` reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils import gather_object

from pipeline.config import Config
from pipeline.data import PromptExample, column_map, load_prompts
from pipeline.errors import PipelineError
from pipeline.lifecycle import Outcome, Stage
from pipeline.progress import progress
from pipeline.text import decode, encode_prompt, eos_ids, generate
from stages.judge import AnnotatorPool, default_pool, gold_ranks, pairwise_agreement
from stages.rewards import load_checked_judge

NUM_SAMPLES = 5


def distinct_responses(texts: Sequence[str], dedup: bool) -> list[str]:
    """Candidates worth ranking, in sampling order.

    Empty responses (an immediate EOS) are dropped even without dedup: the ranked format
    rejects them, and an annotator cannot prefer or reject nothing.
    """
    kept = [t for t in texts if t]
    return list(dict.fromkeys(kept)) if dedup else kept


def ranked_row(example: PromptExample, responses: list[str], scores: list[float],
               pool: AnnotatorPool, key: int) -> dict:
    """One data.jsonl row; ``key`` (the prompt's global index) seeds the annotator's draws.

    A conversational prompt keeps its messages, so the reward model sees the whole context.
    """
    ranks, annotator = pool.rank(scores, rng_key=key)
    return {
        "prompt": list(example.messages) if example.messages else example.prompt,
        "responses": responses,
        "ranks": ranks,
        "reference": example.reference,
        "word": example.word,
        "id": example.id,
        "gold_scores": list(scores),
        "annotator": annotator,
    }


def _sample_view(row: dict) -> dict:
    order = sorted(range(len(row["ranks"])), key=lambda i: row["ranks"][i])
    prompt = row["prompt"]
    return {
        # A conversational prompt is shown by its last user turn, as other samples are.
        "prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
        "reference": row["reference"],
        "responses_best_first": [row["responses"][i] for i in order],
        "gold_scores": [row["gold_scores"][i] for i in order],
    }


class Label(Stage):
    name = "label"

    def check(self) -> None:
        super().check()
        cfg, c = self.cfg, self.cfg.label
        parent = self.open("policy", "sft", c.policy, "label.policy")
        self.examples = load_prompts(cfg.data.label, limit=c.num_prompts,
                                     columns=column_map(cfg.data.columns, "label"),
                                     require_reference="the gold judge scores responses "
                                                       "against it")
        self.model, self.tok = self.load_policy(parent)
        self.model.to(self.accelerator.device)
        # A user judge is called through checks: an exception, or anything but one finite
        # score per response, stops the stage with one line naming it.
        self.judge = load_checked_judge("label.judge", c.judge,
                                        **({"device": str(self.accelerator.device)}
                                           if c.judge == "minilm" else {}))
        self.pool = default_pool(c.annotators.n, c.annotators.temperature,
                                 c.annotators.flip_prob, seed=cfg.run.seed)

    def body(self) -> Outcome:
        cfg, c = self.cfg, self.cfg.label
        accelerator, stage, tracker = self.accelerator, self.stage, self.tracker
        examples, model, tok = self.examples, self.model, self.tok

        # --- Generation: each process samples a disjoint shard of the prompts ---------------------
        with accelerator.split_between_processes(list(range(len(examples)))) as shard:
            shard = list(shard)
        encoded = {i: encode_prompt(tok, examples[i].chat, cfg.data.max_prompt_tokens)
                   for i in shard}
        stops = eos_ids(tok, model)
        sampled: list[tuple[int, list[str]]] = []
        gen_tokens = gen_responses = no_eos = 0
        gen_seconds = 0.0
        bar = progress(len(shard), "label", enabled=cfg.tracking.progress and
                       accelerator.is_main_process, unit="prompts")
        for start in range(0, len(shard), c.batch_size):
            idx = shard[start: start + c.batch_size]
            # Repeating each prompt K times in one call gives a K*batch KV-cache batch: one pass
            # over the prompt batch samples every candidate.
            batch = [encoded[i] for i in idx for _ in range(c.k)]
            t0 = time.perf_counter()
            out = generate(model, tok, batch, max_new_tokens=c.max_new_tokens,
                           temperature=c.temperature, top_p=c.top_p, batch_size=len(batch))
            gen_seconds += time.perf_counter() - t0
            gen_tokens += sum(len(r) for r in out)
            gen_responses += len(out)
            no_eos += sum(not r or r[-1] not in stops for r in out)
            for j, i in enumerate(idx):
                sampled.append((i, [decode(tok, r) for r in out[j * c.k: (j + 1) * c.k]]))
            bar.update(len(idx))
            tracker.log({"gen/prompts_done": start + len(idx),
                         "gen/tokens_per_s": gen_tokens / max(gen_seconds, 1e-9)},
                        step=start + len(idx))
            bar.log(**{"tokens/s": gen_tokens / max(gen_seconds, 1e-9)})
        bar.close()

        # --- Judge and rank (per shard: scores don't depend on which process computes them) -------
        candidates = [(i, distinct_responses(texts, c.dedup)) for i, texts in sampled]
        n_distinct = sum(len(r) for _, r in candidates)
        candidates = [(i, r) for i, r in candidates if len(r) >= 2]
        flat = [(i, text) for i, responses in candidates for text in responses]
        t0 = time.perf_counter()
        # A user judge need not cope with empty input (a shard with every prompt skipped).
        scores = self.judge.score([examples[i].prompt for i, _ in flat], [t for _, t in flat],
                             [examples[i].reference for i, _ in flat]) if flat else []
        judge_seconds = time.perf_counter() - t0

        rows: list[tuple[int, dict]] = []
        agree = compared = tied = 0
        offset = 0
        for i, responses in candidates:
            group = scores[offset: offset + len(responses)]
            offset += len(responses)
            row = ranked_row(examples[i], responses, group, self.pool, key=i)
            if len(set(row["ranks"])) == 1:
                # Equal gold scores with a noiseless annotator: no preference for the RM to learn.
                tied += 1
                continue
            a, n = pairwise_agreement(row["ranks"], gold_ranks(group))
            agree, compared = agree + a, compared + n
            rows.append((i, row))

        stats = {"gen_tokens": gen_tokens, "gen_seconds": gen_seconds,
                 "gen_responses": gen_responses,
                 "no_eos": no_eos, "distinct": n_distinct, "tied": tied, "agree": agree,
                 "compared": compared, "judge_seconds": judge_seconds}
        all_rows = gather_object(rows)
        all_stats = gather_object([stats])

        # --- Save (main process, original prompt order) -------------------------------------------
        data = [row for _, row in sorted(all_rows, key=lambda pair: pair[0])]

        def total(key: str) -> float:
            return sum(s[key] for s in all_stats)

        responses_total = max(total("gen_responses"), 1)
        written_scores = [s for row in data for s in row["gold_scores"]]
        metrics = {
            "prompts": len(examples),
            "rows": len(data),
            "skipped_prompts": len(examples) - len(data),
            "skipped_tied": int(total("tied")),
            "k": c.k,
            "mean_distinct_responses": total("distinct") / max(len(examples), 1),
            # Each process generates concurrently, so throughput adds up across processes.
            "gen_tokens_per_s": sum(s["gen_tokens"] / max(s["gen_seconds"], 1e-9)
                                    for s in all_stats),
            "gen_seconds": round(max(s["gen_seconds"] for s in all_stats), 3),
            "judge_seconds": round(max(s["judge_seconds"] for s in all_stats), 3),
            "mean_gold_score": (sum(written_scores) / len(written_scores)
                                if written_scores else None),
            "agreement_with_gold": (total("agree") / total("compared")
                                    if total("compared") else None),
            "mean_response_tokens": total("gen_tokens") / responses_total,
            "frac_no_eos": total("no_eos") / responses_total,
            "world_size": accelerator.num_processes,
        }
        if not data:
            raise PipelineError(
                f"label: all {len(examples)} prompts were skipped (fewer than 2 distinct non-empty "
                "responses, or all tied); raise label.temperature or label.k"
            )
        stage.write_jsonl(stage.path / "data.jsonl", data)
        samples = [_sample_view(row) for row in data[:NUM_SAMPLES]]
        stage.write_jsonl(stage.samples_path, samples)
        tracker.log_table("samples", samples, step=len(shard))
        metrics["wall_seconds"] = round(time.time() - self.started, 2)
        tracker.log({f"final/{k}": v for k, v in metrics.items() if v is not None}, step=len(shard))
        return Outcome(metrics)


def run(cfg: Config) -> Path:
    """The label stage of ``cfg``'s run; returns its finished folder."""
    return Label(cfg).run()

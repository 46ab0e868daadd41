"""Held-out accuracy of reward-model ensembles against their single members.

Members are rm stages trained on the same ranked data with different ``rm.seed`` (initialisation
of the score head and LoRA, and the data order); the held-out prompts depend only on
``run.seed`` and ``rm.eval_size``, so every member is scored on prompts none of them trained on.
An ensemble's reward is the mean of its members' normalized rewards (each member's own
normalization, as PPO reads it). Accuracy is pairwise, against the annotators' ranks and
against gold, a tied reward counted wrong; intervals are a percentile bootstrap over prompts,
and each ensemble's gain over member 0 is bootstrapped paired, on the same pairs.

    .venv/bin/python bench/rm_ensemble.py --config configs/default.yaml \\
        --data runs/default/label/data.jsonl --sft runs/default/sft \\
        --members runs/default/rm runs/ens-s1/rm runs/ens-s2/rm --out bench/results/rm_ensemble

Choices made from these figures read the annotator column only: gold is for reporting.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import load_ranked  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402
from pipeline.normalization import RewardNormalization  # noqa: E402
from pipeline.rundir import open_parent  # noqa: E402
from stages import fits, reward, scaling  # noqa: E402


def normalized_rewards(member: str, groups: list[reward.Group], tok, cfg) -> torch.Tensor:
    """(N,) one member's normalized reward of every held-out response, flattened by group."""
    parent = open_parent(member, "rm", "--members")
    raw = scaling.heldout_rewards(parent.model_dir, groups, tok, cfg, torch.device("cpu"))
    return RewardNormalization.of(parent).apply(raw.double())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--data", required=True, help="the ranked data the members trained on")
    ap.add_argument("--sft", required=True, help="the SFT stage folder (its tokenizer)")
    ap.add_argument("--members", nargs="+", required=True, help="rm stage folders")
    ap.add_argument("--out", default="bench/results/rm_ensemble")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value, as the stages took them")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    held, _ = reward.heldout_split(load_ranked(args.data), cfg.rm.eval_size, cfg.run.seed)
    tok = load_tokenizer(str(open_parent(args.sft, "sft", "--sft").model_dir), cfg.model)
    groups, _ = reward.encode_groups(tok, held, cfg.data.max_prompt_tokens, cfg.rm.max_seq_len)
    members = [normalized_rewards(m, groups, tok, cfg) for m in args.members]

    rows = []
    base = {}
    for size in range(1, len(members) + 1):
        for combo in itertools.combinations(range(len(members)), size):
            ensemble = torch.stack([members[i] for i in combo]).mean(dim=0)
            row = {"members": list(combo)}
            for judge in ("annotators", "gold"):
                columns = scaling.pair_columns(ensemble, groups)
                prefix = "gold_" if judge == "gold" else ""
                pairs = np.asarray(columns[f"{prefix}pairs"], dtype=float)
                correct = np.asarray(columns[f"{prefix}correct"])
                low, high = fits.ratio_interval(correct, pairs, cfg.eval.bootstrap, cfg.run.seed)
                if combo == (0,):
                    base[judge] = correct
                g_low, g_high = fits.ratio_interval(correct - base[judge], pairs,
                                                    cfg.eval.bootstrap, cfg.run.seed)
                row[judge] = {"accuracy": correct.sum() / pairs.sum(), "low": low, "high": high,
                              "gain_over_member_0": (correct - base[judge]).sum() / pairs.sum(),
                              "gain_low": g_low, "gain_high": g_high, "pairs": int(pairs.sum())}
            rows.append(row)

    lines = [f"# Reward-model ensembles on {len(groups)} held-out prompts\n",
             f"Members: {', '.join(f'{i} = `{m}`' for i, m in enumerate(args.members))}; data "
             f"`{args.data}`. Command: `.venv/bin/python bench/rm_ensemble.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n",
             "| members | vs annotators | gain over 0 | vs gold | gain over 0 |",
             "|---|---|---|---|---|"]
    for r in rows:
        a, g = r["annotators"], r["gold"]
        lines.append(
            f"| {'+'.join(map(str, r['members']))} | {a['accuracy']:.3f} [{a['low']:.3f}, "
            f"{a['high']:.3f}] | {a['gain_over_member_0']:+.3f} [{a['gain_low']:+.3f}, "
            f"{a['gain_high']:+.3f}] | {g['accuracy']:.3f} [{g['low']:.3f}, {g['high']:.3f}] | "
            f"{g['gain_over_member_0']:+.3f} [{g['gain_low']:+.3f}, {g['gain_high']:+.3f}] |")
    write_results(args.out, {"members": args.members, "data": args.data, "rows": rows},
                  "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

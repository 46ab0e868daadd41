"""What running a shared prompt start once saves, on the real default model (SmolLM2-135M).

Three passes that the stages repeat every step, each timed with the prompt start shared
(``trunk_hidden``'s default) and without it (every row its own group), interleaved:

1. rm: the reward model's training step (forward + backward, LoRA r 16) on one batch of the
   default, 2 prompts x K = 8 responses, right-padded; the 8 responses of a prompt share it.
2. ppo: a PPO minibatch pass of the policy (forward + backward, LoRA r 16) on 16 prompts with
   responses, laid out by ``pad_prompts``: the chat template and system prompt every prompt
   starts with sit in the same columns and run once.
3. score: the same 16 rows through the policy without gradients (reference and old log-probs).

Times are CPU seconds of this process (``time.process_time``) at one thread, so that other
work on the machine changes them less than wall time; the median of ``--repeats`` runs.

    .venv/bin/python bench/prefix.py --out bench/results/prefix.json [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", default=str(ROOT / "data/wordnet/ppo.jsonl"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from pipeline.config import LoraConfig, load_config
    from pipeline.models import apply_lora, load_policy, load_reward_backbone
    from pipeline.text import encode_prompt, pad, pad_prompts
    from stages.scoring import PolicyModel, ScoreModel, sequence_scores

    cfg = load_config(ROOT / "configs/default.yaml").model
    lora = LoraConfig(enabled=True, r=16, alpha=32)
    policy_model, tok = load_policy(cfg)
    policy = PolicyModel(apply_lora(policy_model, lora)).train()
    reward = ScoreModel(apply_lora(load_reward_backbone(cfg.name_or_path, cfg, tok, seed=0),
                                   lora, task_type="SEQ_CLS")).train()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:16]]
    prompts = [encode_prompt(tok, r["prompt"], 48) for r in rows]
    # Responses of the default's typical length (~13 tokens), different per row.
    torch.manual_seed(1)
    responses = [torch.randint(100, 5000, (int(n),)).tolist() + [tok.eos_token_id]
                 for n in torch.randint(8, 20, (16,))]

    # 1. RM batch: 2 prompts x 8 responses, right-padded as the rm stage's collate does.
    rm_rows = [prompts[i // 8] + responses[i] for i in range(16)]
    rm_ids = pad(rm_rows, tok.pad_token_id)
    rm_mask = pad([[1] * len(r) for r in rm_rows], 0)
    rm_groups = torch.arange(16) // 8

    # 2-3. PPO rows: 16 prompts laid out by pad_prompts, right-padded responses.
    query, query_mask = pad_prompts(prompts, tok.pad_token_id)
    response = pad(responses, tok.pad_token_id)
    response_mask = pad([[1] * len(r) for r in responses], 0)
    ids = torch.cat([query, response], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    scored = torch.cat([torch.zeros_like(query_mask), response_mask], 1)
    alone = torch.arange(16)

    def rm_step(groups):
        reward.zero_grad()
        sequence_scores(reward, rm_ids, rm_mask, groups=groups).square().mean().backward()

    def ppo_step(groups):
        policy.zero_grad()
        logp, _ = policy(ids, mask, scored, 0.7, groups=groups)
        logp.sum().backward()

    def score(groups):
        with torch.no_grad():
            policy(ids, mask, scored, 0.7, groups=groups)

    cases = {"rm": (rm_step, rm_groups), "ppo": (ppo_step, None), "score": (score, None)}
    times: dict[str, dict[str, list[float]]] = {k: {"shared": [], "plain": []} for k in cases}
    for fn, groups in cases.values():  # warm-up
        fn(groups), fn(alone)
    for _ in range(args.repeats):
        for name, (fn, groups) in cases.items():
            for side, g in (("shared", groups), ("plain", alone)):
                t0 = time.process_time()
                fn(g)
                times[name][side].append(time.process_time() - t0)

    result = {
        "command": "python bench/prefix.py " + " ".join(sys.argv[1:]),
        "model": cfg.name_or_path, "threads": 1, "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "shapes": {"rm": list(rm_ids.shape), "ppo": list(ids.shape),
                   "ppo_shared_columns": int(shared_columns(ids, mask))},
        "cases": {},
    }
    for name, t in times.items():
        shared, plain = statistics.median(t["shared"]), statistics.median(t["plain"])
        result["cases"][name] = {"shared_s": round(shared, 3), "plain_s": round(plain, 3),
                                 "speedup": round(plain / shared, 2)}
        print(f"{name:6s} plain {plain:6.2f} s  shared {shared:6.2f} s  x{plain / shared:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def shared_columns(ids, mask) -> int:
    import torch

    from pipeline.models import shared_prefix

    plan = shared_prefix(torch.zeros(len(ids), dtype=torch.long), ids, mask)
    return 0 if plan is None else plan[2]


if __name__ == "__main__":
    sys.exit(main())
